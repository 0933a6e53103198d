"""Search backends over normalised embeddings: exact inner product, or FAISS tuned to a measured recall.

Size decides: up to `EXACT_MAX` vectors an exact scan is cheap enough (a query reads 100 MB at 50k x 512:
10-30 ms on 2 cores), so nothing is approximated. Above it, "faiss-ivf": an IVF index of 4-bit PQ fast-scan codes, whose candidates are
re-ranked with the exact vectors (`IVF{nlist},PQ{d/4}x4fs,RFlat`). The fast-scan codes make even a scan of
every list cheap (64 bytes a vector at d=512), and the exact re-ranking makes the final scores exact:
only the candidate list is approximate. nprobe and the re-ranking depth (k_factor) are then tuned on a
sample of the indexed vectors used as queries: the cheapest measured setting whose recall@10 against
the exact ranking reaches the target. Uniformly random vectors are the worst case (IVF's clusters tell
little there, so the tuner ends at a high nprobe); real embeddings cluster and need far less.
"faiss-hnsw" (HNSW32 graph, efSearch tuned the same way) is available on request only: it builds tens of
times slower (100k x 512 on 2 cores: ~120 s against ~4 s) and its recall on unclustered data is poor.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipforge.inference.similarity import chunked_topk
from clipforge.io import atomic_path
from clipforge.errors import MissingDependency, SearchError

EXACT_MAX = 50_000
KINDS = ("auto", "exact", "faiss-ivf", "faiss-hnsw")
RECALL_K = 10
MIN_FAISS = 40
SMALL_BATCH = 8  # up to this many queries, FAISS runs on one thread: OpenMP start-up costs more than it saves


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:  # a dependency, but give a clear message if an install lacks it
        raise MissingDependency("the FAISS backend needs the faiss-cpu package: pip install faiss-cpu") from None
    return faiss


def faiss_threads() -> int:
    """OpenMP threads for FAISS work: all cores, or one when they are already busy.

    FAISS's OpenMP threads busy-wait; on oversubscribed cores that collapses (measured on 2 shared
    cores at load 5: IVF build 2.5 s on one thread, 6-10 s on two), so a busy machine gets one thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if os.getloadavg()[0] > cores - 0.5 else cores


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
    index: Any = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [q, k], best first."""
        if self.kind == "exact":
            return exact_search(self.vectors, queries, k)
        faiss = _faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        # omp_set_num_threads sets the calling thread's OpenMP setting only, so concurrent callers are safe.
        faiss.omp_set_num_threads(1 if len(queries) <= SMALL_BATCH else faiss_threads())
        scores, positions = self.index.search(queries, k, params=_search_params(faiss, self.kind, self.params))
        return scores, positions

    def describe(self) -> dict[str, Any]:
        """{"kind": ..., **parameters} as recorded in the manifest."""
        return {"kind": self.kind, **self.params}


def _search_params(faiss: Any, kind: str, params: dict[str, Any]) -> Any:
    if kind == "faiss-ivf":
        return faiss.IndexRefineSearchParameters(k_factor=float(params["k_factor"]),
                                                 base_index_params=faiss.SearchParametersIVF(nprobe=params["nprobe"]))
    return faiss.SearchParametersHNSW(efSearch=params["ef_search"])


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


def build_backend(vectors: np.ndarray, kind: str = "auto", target_recall: float = 0.97, n_queries: int = 200,
                  seed: int = 0) -> Backend:
    """A tuned backend for the normalised rows of `vectors` (parameters and measured recall in `params`)."""
    kind = choose_kind(len(vectors), kind)
    if kind == "exact":
        return Backend("exact", {}, vectors)
    if len(vectors) < MIN_FAISS:  # too few points to train 16 PQ centroids per sub-space; exact is instant
        return Backend("exact", {"requested": kind, "reason": f"fewer than {MIN_FAISS} vectors"}, vectors)
    faiss = _faiss()
    faiss.omp_set_num_threads(faiss_threads())
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    # Queries are indexed vectors, scored on their true top 10 less themselves (finding itself is easy
    # and would flatter the recall that a query from outside the collection gets).
    own = rng.choice(n, min(n_queries, n), replace=False)
    if kind == "faiss-ivf":
        index, params, grid = _build_ivf(faiss, vectors, rng)
    else:
        index, params, grid = _build_hnsw(faiss, vectors)
    built = time.perf_counter() - start
    queries = vectors[own]
    truth = _others(exact_search(vectors, queries, RECALL_K)[1], own)
    best = _tune(faiss, kind, index, params, grid, queries, own, truth, target_recall)
    params.update(best, build_seconds=round(built, 2), tune_seconds=round(time.perf_counter() - start - built, 2),
                  recall_queries=len(queries), recall_target=target_recall)
    return Backend(kind, params, None, index)


def _build_ivf(faiss: Any, vectors: np.ndarray, rng: np.random.Generator) -> tuple[Any, dict, list[dict]]:
    n, dim = vectors.shape
    # ~sqrt(n) lists, each with at least 39 training points (FAISS warns below that).
    nlist = int(max(1, min(round(np.sqrt(n)), n // 39, 65536)))
    # 4 dimensions per 4-bit sub-quantiser (16 centroids each): 64 bytes a vector at d=512 (fp32: 2 KiB).
    pq_m = next(dim // per for per in (4, 2, 1) if dim % per == 0)
    factory = f"IVF{nlist},PQ{pq_m}x4fs"
    base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    # 16 centroids per sub-space train fine on fewer than FAISS's advised 39 x 16 points (the tuner
    # measures the result anyway); this only silences its warning on small collections.
    faiss.downcast_index(base).pq.cp.min_points_per_centroid = 1
    # 40 points per centroid is above FAISS's own warning threshold (39) and keeps k-means short.
    train = vectors[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))]
    base.train(train)
    base.add(vectors)
    index = attach_refine(faiss, base, vectors)
    params = {"factory": f"{factory},RFlat", "nlist": nlist, "pq_m": pq_m, "train_size": len(train)}
    nprobes = sorted({max(1, nlist // d) for d in (64, 16, 8, 4, 2, 1)})
    grid = [{"nprobe": p, "k_factor": f} for p in nprobes for f in (4, 8, 16, 32, 64, 128, 256, 512, 1024)]
    return index, params, grid


def _build_hnsw(faiss: Any, vectors: np.ndarray) -> tuple[Any, dict, list[dict]]:
    dim = vectors.shape[1]
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(vectors)
    params = {"factory": "HNSW32,Flat", "M": 32, "ef_construction": 40}
    return index, params, [{"ef_search": ef} for ef in (16, 32, 64, 128, 256, 512, 1024)]


def attach_refine(faiss: Any, base: Any, vectors: np.ndarray) -> Any:
    """`base` wrapped in an exact re-ranking stage over `vectors` (the rows `base` holds, in order)."""
    flat = faiss.IndexFlatIP(base.d)
    flat.add(vectors)
    index = faiss.IndexRefine(base, flat)
    index.referenced_objects = [base, flat]  # the C++ object does not own them: keep them alive with it
    return index


def _others(positions: np.ndarray, own: np.ndarray) -> list[np.ndarray]:
    """Each row's positions other than the query's own."""
    return [row[row != me] for row, me in zip(positions, own)]


def _tune(faiss: Any, kind: str, index: Any, params: dict, grid: list[dict], queries: np.ndarray,
          own: np.ndarray, truth: np.ndarray, target: float) -> dict[str, Any]:
    """The fastest measured grid setting reaching `target` recall@10 (else the most accurate one)."""
    faiss.omp_set_num_threads(1)  # time settings as single queries run: one thread
    results: list[tuple[bool, float, float, dict]] = []
    saturated: list[dict] = []
    for setting in grid:
        # A setting at least as deep as one that already met the target can only be slower.
        if any(met and _deeper(setting, done) for met, _, _, done in results):
            continue
        # The grid's last key deepens a row (the others fixed); a row whose last step gained nothing is done.
        row = {key: value for key, value in list(setting.items())[:-1]}
        if row in saturated:
            continue
        search_params = _search_params(faiss, kind, {**params, **setting})
        tic = time.perf_counter()
        found = index.search(queries, RECALL_K, params=search_params)[1]
        seconds = (time.perf_counter() - tic) / len(queries)
        recall = recall_at(found, truth)
        previous = results[-1] if results else None
        if previous and all(previous[3][k] == v for k, v in row.items()) and recall - previous[1] < 0.002:
            saturated.append(row)
        results.append((recall >= target, recall, -seconds, setting))
    faiss.omp_set_num_threads(faiss_threads())
    met = [r for r in results if r[0]]
    _, recall, neg_seconds, setting = max(met, key=lambda r: r[2]) if met else max(results, key=lambda r: r[1])
    return {**setting, "recall_at_10": round(recall, 4), "query_ms": round(-neg_seconds * 1000, 3),
            "recall_target_met": bool(met)}


def _deeper(setting: dict, than: dict) -> bool:
    return all(setting[key] >= than[key] for key in than)


def save_backend(backend: Backend, path: Path) -> None:
    """Write the FAISS structure atomically (for IVF only the codes: the exact vectors live in the shards)."""
    faiss = _faiss()
    index = faiss.downcast_index(backend.index.base_index) if backend.kind == "faiss-ivf" else backend.index
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_backend(description: dict[str, Any], path: Path, vectors: np.ndarray) -> Backend:
    """The backend the manifest describes, over the id-ordered `vectors` it was built on."""
    kind = description.get("kind")
    params = {k: v for k, v in description.items() if k != "kind"}
    if kind == "exact":
        return Backend("exact", params, vectors)
    if kind not in ("faiss-ivf", "faiss-hnsw"):
        raise SearchError(f"unknown search backend {kind!r} in the manifest")
    faiss = _faiss()
    index = faiss.read_index(str(path))
    if index.ntotal != len(vectors):
        raise SearchError(f"{path}: holds {index.ntotal} vectors, the index {len(vectors)}")
    if kind == "faiss-ivf":
        index = attach_refine(faiss, index, vectors)
    return Backend(kind, params, None, index)
