"""Vectors that stay on disk: the `.npy` reader/writer, streamed exact top-k, and "faiss-ivf" built from a file."""
from __future__ import annotations

import numpy as np
import pytest

from clipforge.errors import SearchError
from clipforge.search.backend import build_backend, exact_search, load_backend, save_backend
from clipforge.search.vectors import ArrayVectors, VectorFile, exact_topk, write_vectors


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_vector_file_round_trip_from_scattered_blocks(tmp_path):
    array = unit_rows(1000, 24, seed=0)
    order = np.random.default_rng(1).permutation(1000)
    blocks = [(np.sort(part), array[np.sort(part)]) for part in np.array_split(order, 7)]  # gaps inside each
    write_vectors(tmp_path / "v.npy", 1000, 24, blocks)
    file = VectorFile(tmp_path / "v.npy")
    assert (file.n, file.dim) == (1000, 24)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), array)  # an ordinary .npy
    np.testing.assert_array_equal(np.concatenate([b for _, b in file.chunks(333)]), array)
    asked = np.array([999, 3, 4, 5, 3, 0, 500, 501])
    np.testing.assert_array_equal(file.rows(asked), array[asked])
    with pytest.raises(SearchError, match="row positions"):
        file.rows(np.array([1000]))


def test_vector_file_refuses_bad_files(tmp_path):
    with pytest.raises(SearchError, match="rows written"):
        write_vectors(tmp_path / "short.npy", 10, 4, [(np.arange(5), np.zeros((5, 4)))])
    assert not (tmp_path / "short.npy").exists()  # nothing torn left behind
    np.save(tmp_path / "f64.npy", np.zeros((3, 4)))
    with pytest.raises(SearchError, match="float32"):
        VectorFile(tmp_path / "f64.npy")
    np.save(tmp_path / "cut.npy", np.zeros((3, 4), np.float32))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-8])
    with pytest.raises(SearchError, match="truncated"):
        VectorFile(tmp_path / "cut.npy")


def test_streamed_exact_topk_equals_the_in_memory_ranking(tmp_path):
    array, queries = unit_rows(5000, 32, seed=2), unit_rows(20, 32, seed=3)
    write_vectors(tmp_path / "v.npy", 5000, 32, [(np.arange(5000), array)])
    scores, positions = exact_topk(VectorFile(tmp_path / "v.npy"), queries, 7, chunk_rows=999)
    want_scores, want_positions = exact_search(array, queries, 7)
    np.testing.assert_array_equal(positions, want_positions)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim), dtype=np.float32) / np.sqrt(dim)
    rows = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_from_a_file_never_loads_the_matrix_and_scores_exactly(tmp_path, monkeypatch):
    array, queries = np.split(clustered(20_050, 64, seed=4), [20_000])  # queries: same clusters, not indexed
    write_vectors(tmp_path / "v.npy", len(array), 64, [(np.arange(len(array)), array)])

    def no_full_load(self):
        raise AssertionError("the whole matrix was loaded")

    monkeypatch.setattr(VectorFile, "load", no_full_load)
    file = VectorFile(tmp_path / "v.npy")
    backend = build_backend(file, kind="faiss-ivf")
    in_memory = build_backend(array, kind="faiss-ivf")
    assert backend.describe()["nprobe"] == in_memory.describe()["nprobe"]  # same data, same tuning choice
    scores, positions = backend.search(queries, 10)
    # Every returned score is the exact inner product of the query with the returned row.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, array[positions]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    truth = exact_search(array, queries, 10)[1]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(positions.tolist(), truth.tolist())]) >= 0.95

    save_backend(backend, tmp_path / "backend.faiss")
    loaded = load_backend(backend.describe(), tmp_path / "backend.faiss", VectorFile(tmp_path / "v.npy"))
    again = loaded.search(queries, 10)
    np.testing.assert_array_equal(again[1], positions)
    with pytest.raises(SearchError, match="holds"):
        load_backend(backend.describe(), tmp_path / "backend.faiss", ArrayVectors(array[:-1]))


def test_ivf_marks_missing_results_when_k_exceeds_what_the_lists_hold():
    array = clustered(2000, 32, seed=6)
    backend = build_backend(array, kind="faiss-ivf")
    scores, positions = backend.search(array[:3], 100, {"nprobe": 1, "k_factor": 1})
    valid = positions >= 0
    assert 0 < valid.sum() < valid.size  # one list of ~44 vectors cannot give 100
    assert np.all(np.isfinite(scores[valid])) and np.all(np.isneginf(scores[~valid]))
    assert positions[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
