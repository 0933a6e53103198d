"""clipforge.search: build_index / ImageIndex / QueryEncoder, incremental and resumed builds, FAISS, CLI."""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import clipforge
from clipforge.cli.main import main
from clipforge.inference.features import extract_image_features
from clipforge.search import ImageIndex, QueryEncoder, build_backend, build_index, exact_search, store
from clipforge.search import build as build_module
from synthetic import COLORS, draw, make_caption_set

QUERIES = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny seeded model saved as a checkpoint folder (the index records and reloads it)."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), out)
    return out


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> QueryEncoder:
    return QueryEncoder(model_dir)


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """72 PIL-drawn shapes (3 per colour and shape) and their caption CSV."""
    make_caption_set(tmp_path / "data", per_concept=3, name="captions.csv")
    return tmp_path / "data"


def brute_force(model_dir: Path, paths: list[Path], queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
    """Scores and paths of the exact ranking, embedding every image afresh."""
    model, preprocess = clipforge.load(model_dir)
    features = extract_image_features(model, paths, preprocess, batch_size=16).numpy()
    scores = queries @ features.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), [[str(paths[i].absolute()) for i in row] for row in order]


def result_paths(index: ImageIndex, ids: np.ndarray) -> list[list[str]]:
    return [[index.record(int(i))["path"] for i in row] for row in ids]


def assert_same_ranking(index, model_dir, folder, queries, k=10):
    paths = sorted(p for p in folder.rglob("*.png"))
    scores, ids = index.search(queries, k)
    want_scores, want_paths = brute_force(model_dir, paths, queries, k)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert result_paths(index, ids) == want_paths


def test_text_and_image_search_equal_brute_force(shapes, model_dir, encoder, tmp_path):
    stats = build_index(shapes / "images", tmp_path / "index", model=model_dir, batch_size=16, progress=False)
    assert (stats.added, stats.updated, stats.removed, stats.unchanged, stats.total) == (72, 0, 0, 0, 72)
    index = ImageIndex.open(tmp_path / "index")
    assert len(index) == 72 and index.dim == encoder.dim and index.model == str(model_dir.resolve())
    assert index.backend["kind"] == "exact"
    texts = encoder.embed_texts(QUERIES)
    assert texts.dtype == np.float32 and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert_same_ranking(index, model_dir, shapes / "images", texts)
    query_image = draw(COLORS["red"], "circle", random.Random(5))
    images = encoder.embed_images([query_image])
    assert_same_ranking(index, model_dir, shapes / "images", images)
    scores, ids = index.search(texts, 500)  # k larger than the index: all of it
    assert scores.shape == ids.shape == (3, 72) and len(set(ids[0].tolist())) == 72
    record = index.record(int(ids[0, 0]))
    assert set(record) == {"id", "path", "size", "mtime", "caption", "caption_generated"}
    assert Path(record["path"]).is_absolute()
    assert record["caption_generated"] is False  # the source's caption (or none); `index --captions` writes others
    assert record["size"] == Path(record["path"]).stat().st_size and record["caption"] is None
    with pytest.raises(KeyError):
        index.record(10_000)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["format"] == "clipforge-index" and manifest["count"] == 72 and manifest["dim"] == index.dim


def test_incremental_add_change_delete(shapes, model_dir, encoder, tmp_path):
    images, out = shapes / "images", tmp_path / "index"
    build_index(images, out, model=model_dir, progress=False, shard_size=16)
    before = ImageIndex.open(out)
    id_of = {before.record(int(i))["path"]: int(i) for i in before.ids}

    again = build_index(images, out, model=model_dir, progress=False, shard_size=16)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 72)

    files = sorted(images.glob("*.png"))
    deleted, changed = files[0], files[1]
    deleted.unlink()
    draw(COLORS["yellow"], "cross", random.Random(1)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime surely differs on coarse clocks
    added = images / "zz_new.png"
    draw(COLORS["blue"], "circle", random.Random(2)).save(added)
    stats = build_index(images, out, model=model_dir, progress=False, shard_size=16)
    assert (stats.added, stats.updated, stats.removed, stats.unchanged, stats.total) == (1, 1, 1, 70, 72)

    index = ImageIndex.open(out)
    now = {index.record(int(i))["path"]: int(i) for i in index.ids}
    assert str(deleted.absolute()) not in now
    assert now[str(changed.absolute())] == id_of[str(changed.absolute())]  # a changed file keeps its id
    assert all(now[p] == i for p, i in id_of.items() if p in now)
    assert now[str(added.absolute())] > max(id_of.values())  # new ids are never reused ones
    assert_same_ranking(index, model_dir, images, encoder.embed_texts(QUERIES))


def test_repacking_keeps_results(shapes, model_dir, encoder, tmp_path):
    images, out = shapes / "images", tmp_path / "index"
    build_index(images, out, model=model_dir, progress=False, shard_size=16)
    for path in sorted(images.glob("*.png"))[:60]:  # leaves most shards less than half full
        path.unlink()
    build_index(images, out, model=model_dir, progress=False, shard_size=16)
    con = sqlite3.connect(out / store.DATABASE)
    live = dict(con.execute("SELECT shard, COUNT(*) FROM images GROUP BY shard"))
    rows = dict(con.execute("SELECT name, rows FROM shards"))
    assert set(store.shard_files(out)) == set(live) == set(rows)  # emptied shard files are gone
    assert all(live[name] * 2 >= rows[name] for name in live) and len(live) < 5  # half-empty ones re-packed
    assert_same_ranking(ImageIndex.open(out), model_dir, images, encoder.embed_texts(QUERIES))


def test_unreadable_images_are_skipped_and_counted(shapes, model_dir, tmp_path):
    images = shapes / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "empty.jpg").write_bytes(b"")
    stats = build_index(images, tmp_path / "index", model=model_dir, progress=False)
    assert stats.total == 72 and stats.skipped == {"corrupt_image": 1, "empty_file": 1}
    again = build_index(images, tmp_path / "index", model=model_dir, progress=False)
    assert again.skipped == stats.skipped and again.unchanged == 72
    victim = sorted(images.glob("captions_*.png"))[0]  # an indexed file that turns unreadable leaves the index
    victim.write_bytes(b"garbage")
    third = build_index(images, tmp_path / "index", model=model_dir, progress=False)
    assert third.total == 71 and third.skipped == {"corrupt_image": 2, "empty_file": 1}
    index = ImageIndex.open(tmp_path / "index")
    assert str(victim.absolute()) not in {index.record(int(i))["path"] for i in index.ids}


def test_decoding_workers_give_the_same_index_as_one_process(shapes, model_dir, tmp_path):
    images = shapes / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shard = tmp_path / "part.tar"  # tar members too: each worker opens the shard itself
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(sorted(images.glob("*.png"))[:11]):
            tar.add(path, arcname=f"{i:04d}.png")
    for source, count in ((images, 72), (shard, 10)):
        built = {}
        for workers in (0, 2):
            out = tmp_path / f"{source.name}-{workers}"
            stats = build_index(source, out, model=model_dir, progress=False, batch_size=8, workers=workers)
            index = ImageIndex.open(out)
            built[workers] = (stats.skipped, result_paths(index, index.ids[None]), index_vectors_of(index))
        assert built[0][0] == built[2][0] == {"corrupt_image": 1}
        assert built[0][1] == built[2][1] and len(built[0][1][0]) == count
        assert np.array_equal(built[0][2], built[2][2])  # the same batches reach the model: identical vectors


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_resume_after_kill_before_a_shard_is_recorded(shapes, model_dir, encoder, tmp_path, monkeypatch):
    images, out = shapes / "images", tmp_path / "index"
    real_ingest, calls = build_module.IndexBuild._ingest, []

    def ingest_then_die(build, names):
        calls.append(names)
        if len(calls) == 3:  # calls: adopting pending shards (none), shard 1, shard 2: dies before recording it
            raise Killed
        return real_ingest(build, names)

    monkeypatch.setattr(build_module.IndexBuild, "_ingest", ingest_then_die)
    with pytest.raises(Killed):
        build_index(images, out, model=model_dir, progress=False, shard_size=16)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ImageIndex.open(out)  # no manifest yet: not mistaken for a finished index
    assert len(store.shard_files(out)) == 2

    stats = build_index(images, out, model=model_dir, progress=False, shard_size=16)
    assert stats.resumed == 16 and stats.unchanged == 16 and stats.added == 72 - 16 and stats.total == 72
    assert_same_ranking(ImageIndex.open(out), model_dir, images, encoder.embed_texts(QUERIES))


def test_kill_while_writing_a_shard_leaves_no_partial_file(shapes, model_dir, tmp_path, monkeypatch):
    images, out = shapes / "images", tmp_path / "index"
    build_index(images, out, model=model_dir, progress=False, shard_size=16)
    for path in sorted(images.glob("*.png"))[:20]:
        draw(COLORS["black"], "square", random.Random(3)).save(path)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    real_replace = os.replace

    def die_on_shard(src, dst):
        if str(dst).endswith(".npz"):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_shard)
    with pytest.raises(Killed):
        build_index(images, out, model=model_dir, progress=False, shard_size=16)
    monkeypatch.undo()
    index = ImageIndex.open(out)  # the previous build is still whole and searchable
    assert len(index) == 72
    stats = build_index(images, out, model=model_dir, progress=False, shard_size=16)
    assert (stats.updated, stats.unchanged) == (20, 52)
    assert not list((out / store.SHARD_DIR).glob(".*.tmp"))


def test_interrupted_update_falls_back_to_exact(shapes, model_dir, tmp_path):
    out = tmp_path / "index"
    build_index(shapes / "images", out, model=model_dir, progress=False, backend="faiss-ivf")
    assert ImageIndex.open(out).backend["kind"] == "faiss-ivf"
    con = store.connect(out)
    with store.transaction(con):
        store.bump_generation(con)  # as a killed update leaves it
    con.close()
    with pytest.warns(UserWarning, match="searching exactly"):
        assert ImageIndex.open(out).backend["kind"] == "exact"


def test_open_reads_the_vector_file_not_the_shards(shapes, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(shapes / "images", out, model=model_dir, progress=False, backend="faiss-ivf")
    want = index_vectors_of(ImageIndex.open(out))
    with monkeypatch.context() as patch:
        patch.setattr(store, "load_vectors", lambda *a: pytest.fail("the shards were read"))
        index = ImageIndex.open(out)
        scores, ids = index.search(want[:4], 5)
    found = want[np.searchsorted(index.ids, ids)]  # [4, 5, dim]: the vectors of the returned ids
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", want[:4], found), atol=1e-5)  # exact scores
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["vectors"]  # as an index written before the vector file existed
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="older clipforge"):
        assert ImageIndex.open(out).backend["kind"] == "exact"


def test_caption_csv_source_and_caption_only_change(shapes, model_dir, tmp_path):
    csv_path, out = shapes / "captions.csv", tmp_path / "index"
    stats = build_index(csv_path, out, model=model_dir, progress=False)
    index = ImageIndex.open(out)
    assert stats.total == 72
    captions = {index.record(int(i))["caption"] for i in index.ids}
    assert "a red circle" in captions and None not in captions
    lines = csv_path.read_text().splitlines()
    first_image = lines[1].split(",")[0]
    lines[1] = f"{first_image},a renamed thing,x"
    csv_path.write_text("\n".join(lines) + "\n")
    stats = build_index(csv_path, out, model=model_dir, progress=False)
    assert (stats.updated, stats.unchanged, stats.added) == (1, 71, 0)
    index = ImageIndex.open(out)
    assert "a renamed thing" in {index.record(int(i))["caption"] for i in index.ids}


def test_webdataset_source(shapes, model_dir, tmp_path):
    shard = tmp_path / "data-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(sorted((shapes / "images").glob("*.png"))[:12]):
            tar.add(path, arcname=f"{i:04d}.png")
            caption = tmp_path / "caption.txt"
            caption.write_text(f"caption {i}")
            tar.add(caption, arcname=f"{i:04d}.txt")
    stats = build_index(shard, tmp_path / "index", model=model_dir, progress=False)
    index = ImageIndex.open(tmp_path / "index")
    assert stats.total == 12
    record = index.record(int(index.ids[0]))
    assert record["path"] == f"{shard}#0000.png" and record["caption"] == "caption 0"
    scores, ids = index.search(index_vectors_of(index)[:1], 1)
    assert ids[0, 0] == index.ids[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def index_vectors_of(index: ImageIndex) -> np.ndarray:
    con = sqlite3.connect(index.path / store.DATABASE)
    return store.load_vectors(index.path, con, index.dim)[1]


def test_open_errors_are_clear(tmp_path, shapes, model_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageIndex.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a clipforge index"):
        ImageIndex.open(shapes)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a clipforge index"):
        ImageIndex.open(tmp_path / "bad")
    build_index(shapes / "images", tmp_path / "index", model=model_dir, progress=False)
    other = tmp_path / "other-model"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=1), other)
    with pytest.raises(ValueError, match="was built with model"):
        build_index(shapes / "images", tmp_path / "index", model=other, progress=False)
    with pytest.raises(ValueError, match="queries must be"):
        ImageIndex.open(tmp_path / "index").search(np.zeros((1, 3), np.float32), 1)


def test_faiss_backends_through_the_index(shapes, model_dir, encoder, tmp_path):
    for kind in ("faiss-ivf", "faiss-hnsw"):
        out = tmp_path / kind
        stats = build_index(shapes / "images", out, model=model_dir, progress=False, backend=kind)
        assert stats.backend["kind"] == kind and stats.backend["recall_at_10"] >= 0.97
        index = ImageIndex.open(out)
        assert index.backend == stats.backend
        queries = encoder.embed_texts(QUERIES)
        scores, ids = index.search(queries, 5)
        exact_scores, positions = exact_search(index_vectors_of(index), queries, 5)
        np.testing.assert_allclose(scores, exact_scores, atol=1e-5)  # re-ranked exactly: exact scores


def test_faiss_recall_at_10_on_100k_random_vectors():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((100_000, 512), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((200, 512), dtype=np.float32)  # not from the collection
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    backend = build_backend(vectors, kind="auto")
    params = backend.describe()
    assert params["kind"] == "faiss-ivf" and {"nlist", "nprobe", "k_factor", "recall_at_10"} <= set(params)
    found = backend.search(queries, 10)[1]
    truth = exact_search(vectors, queries, 10)[1]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.95, (recall, params)


def test_cli_index_and_search(shapes, model_dir, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", str(shapes / "images"), "--model", str(model_dir), "--out", str(out), "--quiet"]) == 0
    assert "72 images; added 72" in capsys.readouterr().out
    assert main(["search", str(out), "a red circle", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1" and lines[0].split()[2].endswith(".png")
    query = sorted((shapes / "images").glob("*.png"))[5]
    assert main(["search", str(out), "--image", str(query), "--json", "-k", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["path"] == str(query.absolute()) and result["results"][0]["score"] > 0.9999
    assert main(["search", str(tmp_path / "nothing"), "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["search", str(out)]) == 2  # neither a text nor an image
    assert "no query: give a text" in capsys.readouterr().err
    long_query = " ".join(["red"] * 100)
    assert main(["search", str(out), long_query]) == 2 and "--truncate" in capsys.readouterr().err
    assert main(["search", str(out), long_query, "--truncate", "-k", "1"]) == 0
    shutil.rmtree(shapes / "images")
    (shapes / "images").mkdir()
    assert main(["index", str(shapes / "images"), "--model", str(model_dir), "--out", str(tmp_path / "i2")]) == 2
    assert "no readable images" in capsys.readouterr().err
    assert not (tmp_path / "i2").exists()  # nothing left to read later as "an interrupted first build"
    # An index that holds images is never removed, whatever the new source holds.
    assert main(["index", str(shapes / "images"), "--model", str(model_dir), "--out", str(out), "--quiet"]) == 0
    assert (out / "manifest.json").is_file()


def test_query_encoder_is_thread_safe(encoder):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"a {color} {shape}" for color in COLORS for shape in ("circle", "square")]
    serial = [encoder.embed_texts([t]) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda t: encoder.embed_texts([t]), texts))
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert encoder.embed_texts([]).shape == (0, encoder.dim)


def test_export_npy_in_clip_retrievals_layout(shapes, model_dir, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq  # the export extra, part of the test extra
    build_index(shapes / "images", tmp_path / "index", model=model_dir, progress=False)
    index = ImageIndex.open(tmp_path / "index")
    with monkeypatch.context() as patch:  # a current index exports from vectors.npy, part by part
        patch.setattr(store, "load_vectors", lambda *a: pytest.fail("the shards were read whole"))
        assert main(["export", "npy", str(tmp_path / "index"), str(tmp_path / "out"), "--part-size", "50",
                     "--dtype", "float32"]) == 0
    assert "72 embeddings" in capsys.readouterr().out
    vectors = np.concatenate([np.load(tmp_path / "out" / "img_emb" / f"img_emb_{i}.npy") for i in range(2)])
    meta = [pq.read_table(tmp_path / "out" / "metadata" / f"metadata_{i}.parquet").to_pylist() for i in range(2)]
    rows = meta[0] + meta[1]
    assert len(meta[0]) == 50 and len(rows) == 72 and vectors.shape == (72, index.dim)
    np.testing.assert_array_equal(vectors, index_vectors_of(index))  # row r of the .npy is row r of the parquet
    assert [r["image_path"] for r in rows] == [index.record(r["id"])["path"] for r in rows]
    assert main(["export", "npy", str(tmp_path / "index"), str(tmp_path / "half")]) == 0
    half = np.load(tmp_path / "half" / "img_emb" / "img_emb_0.npy")
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - vectors).max() < 1e-3
