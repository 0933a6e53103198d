"""Search backends over normalised embeddings: exact inner product, or FAISS tuned to a measured recall.

Size decides: up to `EXACT_MAX` vectors an exact scan is cheap enough (a query reads 100 MB at 50k x 512:
10-30 ms on 2 cores), so nothing is approximated. Above it, "faiss-ivf" (`ivf.py`): IVF-PQ fast-scan
candidates, re-ranked on 8-bit codes, the final k scored exactly from the float32 vectors, which may stay
on disk: under 600 bytes of memory a vector at d=512, so 10M vectors fit on one machine. nprobe and the
candidate depth (k_factor) are then tuned on a sample of the indexed vectors used as queries: the
cheapest measured setting whose recall@10 against the exact ranking reaches the target. Uniformly random
vectors are the worst case (IVF's clusters tell little there, so the tuner ends at a high nprobe); real
embeddings cluster and need far less.
"faiss-hnsw" (HNSW32 graph over float32 vectors, efSearch tuned the same way) is available on request
only: it holds every vector in memory, builds tens of times slower (100k x 512 on 2 cores: ~120 s against
~4 s) and its recall on unclustered data is poor.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipforge.errors import MissingDependency, SearchError
from clipforge.inference.similarity import chunked_topk
from clipforge.io import atomic_path
from clipforge.search.ivf import IvfSq8
from clipforge.search.vectors import ArrayVectors, Vectors, exact_topk

EXACT_MAX = 50_000
KINDS = ("auto", "exact", "faiss-ivf", "faiss-hnsw")
RECALL_K = 10
MIN_FAISS = 40
SMALL_BATCH = 8  # up to this many queries, FAISS runs on one thread: OpenMP start-up costs more than it saves


def _faiss() -> Any:
    if "faiss" not in sys.modules:
        _set_openblas_core()
    try:
        import faiss
    except ImportError:  # a dependency, but give a clear message if an install lacks it
        raise MissingDependency("the FAISS backend needs the faiss-cpu package: pip install faiss-cpu") from None
    return faiss


def _set_openblas_core() -> None:
    """Tell faiss-cpu's own OpenBLAS which kernels this CPU runs, unless the user already did.

    On virtual machines whose CPU model it does not know, that OpenBLAS falls back to its Prescott (SSE3)
    kernels: measured on a 2-core Xeon VM with AVX-512, IVF's coarse assignment (65k x 1000 x 512) took
    2.4 s instead of 0.37 s. OpenBLAS reads OPENBLAS_CORETYPE once, when faiss loads it; the kernel is
    chosen from the instruction sets the CPU reports, so it never asks for one the CPU lacks.
    """
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


def faiss_threads() -> int:
    """OpenMP threads for FAISS work: all cores, or one when other processes already keep them busy.

    FAISS's OpenMP threads busy-wait; on oversubscribed cores that collapses (measured on 2 shared
    cores at load 5: IVF build 2.5 s on one thread, 6-10 s on two), so a busy machine gets one thread.
    "Busy" counts the threads runnable right now besides this one (/proc/loadavg's 4th field), not the
    load average: that average includes this process's own recent work (a torch matmul just before a
    build would otherwise halve the build's threads).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        others = [int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1 for _ in range(3)]
    except (OSError, ValueError, IndexError):
        return 1 if os.getloadavg()[0] > cores - 0.5 else cores
    return 1 if sorted(others)[1] >= cores else cores


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) [q, k] of the k largest inner products, best first (k <= len(vectors))."""
    keys, q = torch.from_numpy(vectors), torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    if len(q) * len(keys) <= 1 << 26:  # up to 256 MB of scores: one product (chunking only adds overhead)
        positions = (q @ keys.t()).topk(k, dim=1).indices
    else:
        positions = chunked_topk(q, keys, k)
    scores = torch.einsum("qd,qkd->qk", q, keys[positions])
    # Re-sort on the recomputed scores so the order and the printed scores can never disagree.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order).numpy(), positions.gather(1, order).numpy()


@dataclass
class Backend:
    """A search structure over the id-ordered vector matrix; `search` returns row positions in it."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    vectors: np.ndarray | None = None  # kept for "exact"; FAISS holds its own copy
    index: Any = None  # IvfSq8 for "faiss-ivf", a FAISS index for "faiss-hnsw"

    def search(self, queries: np.ndarray, k: int, setting: dict[str, Any] | None = None,
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [q, k], best first, with the tuned parameters unless `setting` overrides them."""
        if self.kind == "exact":
            return exact_search(self.vectors, queries, k)
        faiss = _faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        # omp_set_num_threads sets the calling thread's OpenMP setting only, so concurrent callers are safe.
        faiss.omp_set_num_threads(threads or (1 if len(queries) <= SMALL_BATCH else faiss_threads()))
        params = {**self.params, **(setting or {})}
        if self.kind == "faiss-ivf":
            return self.index.search(faiss, queries, k, params["nprobe"], params["k_factor"])
        return self.index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=params["ef_search"]))

    def describe(self) -> dict[str, Any]:
        """{"kind": ..., **parameters} as recorded in the manifest."""
        return {"kind": self.kind, **self.params}


def choose_kind(n: int, kind: str = "auto") -> str:
    """The backend for `n` vectors: "exact" up to EXACT_MAX, "faiss-ivf" above, unless one is asked for."""
    if kind not in KINDS:
        raise SearchError(f"unknown search backend {kind!r}; choose from {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "exact" if n <= EXACT_MAX else "faiss-ivf"


def recall_at(found: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Mean fraction of each query's true top-k (a row of `truth`) found in its returned top-k."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def build_backend(vectors: np.ndarray | Vectors, kind: str = "auto", target_recall: float = 0.97,
                  n_queries: int = 200, seed: int = 0) -> Backend:
    """A tuned backend for the normalised rows of `vectors` (parameters and measured recall in `params`).

    `vectors` may be a `VectorFile`: "faiss-ivf" then reads it in chunks and keeps it for exact scores,
    so the float32 matrix is never in memory.
    """
    source = ArrayVectors(vectors) if isinstance(vectors, np.ndarray) else vectors
    kind = choose_kind(source.n, kind)
    if kind == "exact" or source.n < MIN_FAISS:
        # Too few points to train 16 PQ centroids per sub-space; an exact scan is instant anyway.
        note = {} if kind == "exact" else {"requested": kind, "reason": f"fewer than {MIN_FAISS} vectors"}
        return Backend("exact", note, source.load())
    faiss = _faiss()
    faiss.omp_set_num_threads(faiss_threads())
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    # Queries are indexed vectors, scored on their true top 10 less themselves (finding itself is easy
    # and would flatter the recall that a query from outside the collection gets).
    own = np.sort(rng.choice(source.n, min(n_queries, source.n), replace=False))
    if kind == "faiss-ivf":
        index, params = IvfSq8.build(faiss, source, rng)
        nprobes = sorted({max(1, params["nlist"] // d) for d in (64, 16, 8, 4, 2, 1)})
        grid = [{"nprobe": p, "k_factor": f} for p in nprobes for f in (4, 8, 16, 32, 64, 128, 256, 512, 1024)]
    else:
        index, params, grid = _build_hnsw(faiss, source)
    backend = Backend(kind, params, None, index)
    built = time.perf_counter() - start
    queries = source.rows(own)
    truth = _others(exact_topk(source, queries, RECALL_K)[1], own)
    best = _tune(backend, grid, queries, truth, target_recall)
    params.update(best, build_seconds=round(built, 2), tune_seconds=round(time.perf_counter() - start - built, 2),
                  recall_queries=len(queries), recall_target=target_recall)
    return backend


def _build_hnsw(faiss: Any, vectors: Vectors) -> tuple[Any, dict, list[dict]]:
    index = faiss.IndexHNSWFlat(vectors.dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    for _, block in vectors.chunks():
        index.add(block)
    params = {"factory": "HNSW32,Flat", "M": 32, "ef_construction": 40}
    return index, params, [{"ef_search": ef} for ef in (16, 32, 64, 128, 256, 512, 1024)]


def _others(positions: np.ndarray, own: np.ndarray) -> list[np.ndarray]:
    """Each row's positions other than the query's own."""
    return [row[row != me] for row, me in zip(positions, own)]


def _tune(backend: Backend, grid: list[dict], queries: np.ndarray, truth: list[np.ndarray],
          target: float) -> dict[str, Any]:
    """The fastest measured grid setting reaching `target` recall@10 (else the most accurate one).

    Every grid key makes a search slower as it grows, which prunes the grid: a setting at least as deep
    as one that met the target, or as one already slower than the fastest that met it, is not tried.
    """
    results: list[tuple[bool, float, float, dict]] = []
    saturated: list[dict] = []
    for setting in grid:
        fastest_met = max((-s for met, _, s, _ in results if met), default=None)
        if any(_deeper(setting, done) and (met or (fastest_met is not None and -s > fastest_met))
               for met, _, s, done in results):
            continue
        # The grid's last key deepens a row (the others fixed); a row whose last step gained nothing is done.
        row = {key: value for key, value in list(setting.items())[:-1]}
        if row in saturated:
            continue
        tic = time.perf_counter()
        # One thread: time settings as single queries run.
        found = backend.search(queries, RECALL_K, setting, threads=1)[1]
        seconds = (time.perf_counter() - tic) / len(queries)
        recall = recall_at(found, truth)
        previous = results[-1] if results else None
        if previous and all(previous[3][k] == v for k, v in row.items()) and recall - previous[1] < 0.002:
            saturated.append(row)
        results.append((recall >= target, recall, -seconds, setting))
    met = [r for r in results if r[0]]
    _, recall, neg_seconds, setting = max(met, key=lambda r: r[2]) if met else max(results, key=lambda r: r[1])
    return {**setting, "recall_at_10": round(recall, 4), "query_ms": round(-neg_seconds * 1000, 3),
            "recall_target_met": bool(met)}


def _deeper(setting: dict, than: dict) -> bool:
    return all(setting[key] >= than[key] for key in than)


def save_backend(backend: Backend, path: Path) -> None:
    """Write the FAISS structure atomically (for IVF not the exact vectors: they are the index's own file)."""
    faiss = _faiss()
    with atomic_path(path) as tmp:
        faiss.write_index(backend.index.index if backend.kind == "faiss-ivf" else backend.index, str(tmp))


def load_backend(description: dict[str, Any], path: Path, vectors: Vectors) -> Backend:
    """The backend the manifest describes, over the id-ordered `vectors` it was built on."""
    kind = description.get("kind")
    params = {k: v for k, v in description.items() if k != "kind"}
    if kind == "exact":
        return Backend("exact", params, vectors.load())
    if kind not in ("faiss-ivf", "faiss-hnsw"):
        raise SearchError(f"unknown search backend {kind!r} in the manifest")
    faiss = _faiss()
    if kind == "faiss-ivf":
        return Backend(kind, params, None, IvfSq8.load(faiss, path, vectors))  # it checks the counts agree
    index = faiss.read_index(str(path))
    if index.ntotal != vectors.n:
        raise SearchError(f"{path}: holds {index.ntotal} vectors, the index {vectors.n}")
    return Backend(kind, params, None, index)
