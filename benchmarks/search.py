"""Search latency and recall of the index backends at 1M random normalised vectors (d=512).

Builds the backend `build_index` would pick (or --backend) over --n vectors, then times --queries single
queries (k=10, one at a time, as a search request runs) that are not in the collection, and measures their
recall@10 against the exact ranking. --data uniform draws points uniformly on the sphere (the hardest
case: nothing clusters); --data clustered draws them around 1000 centres, closer to real embeddings.

    .venv/bin/python benchmarks/search.py [--n 1000000] [--dim 512] [--data uniform|clustered] [--backend auto]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from clipforge.search.backend import build_backend, exact_search, recall_at


def random_vectors(n: int, dim: int, data: str, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    """n unit vectors: uniform on the sphere, or Gaussian blobs around `centres`."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in blocks: the float64 intermediates of 1M x 512 would be 4 GB
        rows = min(100_000, n - start)
        block = rng.standard_normal((rows, dim), dtype=np.float32)
        if data == "clustered":
            block = centres[rng.integers(0, len(centres), rows)] + 0.6 * block / np.sqrt(dim)
        out[start : start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=("uniform", "clustered"), default="uniform")
    parser.add_argument("--backend", default="auto", help="auto, exact, faiss-ivf or faiss-hnsw")
    parser.add_argument("--target-recall", type=float, default=0.97)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    vectors = random_vectors(args.n, args.dim, args.data, rng, centres)
    queries = random_vectors(args.queries, args.dim, args.data, rng, centres)
    tic = time.perf_counter()
    truth = exact_search(vectors, queries, args.k)[1]
    exact_batch_ms = (time.perf_counter() - tic) / len(queries) * 1000
    backend = build_backend(vectors, args.backend, args.target_recall)
    params = backend.describe()

    backend.search(queries[:5], args.k)  # warm-up: first-touch page faults, OpenMP start
    latencies, found = [], []
    for query in queries:
        tic = time.perf_counter()
        found.append(backend.search(query[None], args.k)[1][0])
        latencies.append(time.perf_counter() - tic)
    ms = np.array(latencies) * 1000
    exact_single = []
    for query in queries[:10]:
        tic = time.perf_counter()
        exact_search(vectors, query[None], args.k)
        exact_single.append(time.perf_counter() - tic)

    shown = {k: v for k, v in params.items() if k in ("factory", "nlist", "nprobe", "k_factor", "ef_search")}
    print(f"{args.n:,} vectors, d={args.dim}, {args.data}; {len(queries)} single queries not in the collection, "
          f"k={args.k}\n")
    print("| backend | parameters | build (s) | tune (s) | p50 (ms) | p99 (ms) | recall@10 vs exact | "
          "tuning recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {params['kind']} | {', '.join(f'{k}={v}' for k, v in shown.items()) or '-'} | "
          f"{params.get('build_seconds', 0):.1f} | {params.get('tune_seconds', 0):.1f} | {np.percentile(ms, 50):.2f} | "
          f"{np.percentile(ms, 99):.2f} | {recall_at(np.array(found), truth):.3f} | {params.get('recall_at_10', '-')} |")
    print(f"| exact (reference) | torch matmul + top-k | - | - | {np.median(exact_single) * 1000:.2f} | "
          f"{np.max(exact_single) * 1000:.2f} (max of 10) | 1.000 | - |")
    print(f"\nexact, batched over all {len(queries)} queries: {exact_batch_ms:.2f} ms a query")


if __name__ == "__main__":
    main()
