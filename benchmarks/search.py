"""Search latency, recall and memory of the index backends at 1M-10M normalised vectors (d=512).

Writes --n vectors in chunks to a `.npy` file in --workdir (20 GB at 10M: they are never all in memory as
float32), builds the backend `build_index` would pick (or --backend) from that file, then times
--queries single queries (k=10, one at a time, as a search request runs) that are not in the collection
and measures their recall@10 against the exact ranking (one streamed pass over the file). --data uniform
draws points uniformly on the sphere (the hardest case: nothing clusters); --data clustered draws them
around 1000 centres, closer to real embeddings. Memory: the process's peak resident set, and the saved
structure's bytes a vector (what a search process holds besides the ids).

    .venv/bin/python benchmarks/search.py [--n 1000000] [--data uniform|clustered] [--workdir /tmp/...]
    .venv/bin/python benchmarks/search.py --n 10000000 --data clustered
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from clipforge.search.backend import build_backend, exact_search, recall_at, save_backend
from clipforge.search.vectors import VectorFile, exact_topk, write_vectors

BLOCK = 100_000
GIB = 1 << 30


def random_blocks(n: int, dim: int, data: str, rng: np.random.Generator,
                  centres: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, unit vectors) blocks: uniform on the sphere, or Gaussian blobs around `centres`."""
    for start in range(0, n, BLOCK):
        rows = min(BLOCK, n - start)
        block = rng.standard_normal((rows, dim), dtype=np.float32)
        if data == "clustered":
            block = centres[rng.integers(0, len(centres), rows)] + 0.6 * block / np.sqrt(dim)
        yield np.arange(start, start + rows), block / np.linalg.norm(block, axis=1, keepdims=True)


def resident_gib() -> float:
    """The process's resident set now (Linux /proc), in GiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / GIB


def peak_gib() -> float:
    """The process's peak resident set so far, in GiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=("uniform", "clustered"), default="uniform")
    parser.add_argument("--backend", default="auto", help="auto, exact, faiss-ivf or faiss-hnsw")
    parser.add_argument("--target-recall", type=float, default=0.97)
    parser.add_argument("--workdir", type=Path, default=None, help="where the vector file goes (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clipforge-search-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    """Generate, build, time, and print the table."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    path = workdir / f"vectors-{args.n}-{args.dim}-{args.data}.npy"
    tic = time.perf_counter()
    write_vectors(path, args.n, args.dim, random_blocks(args.n, args.dim, args.data, rng, centres))
    generated = time.perf_counter() - tic
    vectors = VectorFile(path)
    queries = np.concatenate([b for _, b in random_blocks(args.queries, args.dim, args.data, rng, centres)])
    tic = time.perf_counter()
    truth = exact_topk(vectors, queries, args.k)[1]
    exact_batch_ms = (time.perf_counter() - tic) / len(queries) * 1000

    before = resident_gib()
    backend = build_backend(vectors, args.backend, args.target_recall)
    held = resident_gib() - before
    params = backend.describe()
    backend.search(queries[:5], args.k)  # warm-up: first-touch page faults, OpenMP start
    latencies, found = [], []
    for query in queries:
        tic = time.perf_counter()
        found.append(backend.search(query[None], args.k)[1][0])
        latencies.append(time.perf_counter() - tic)
    ms = np.array(latencies) * 1000
    peak = peak_gib()
    saved = 0
    if backend.index is not None:
        save_backend(backend, workdir / "backend.faiss")
        saved = (workdir / "backend.faiss").stat().st_size

    shown = {k: v for k, v in params.items() if k in ("factory", "nlist", "nprobe", "k_factor", "ef_search")}
    print(f"{args.n:,} vectors, d={args.dim}, {args.data}; {len(queries)} single queries not in the collection, "
          f"k={args.k}; vectors written in {generated:.0f} s\n")
    print("| backend | parameters | build (s) | tune (s) | p50 (ms) | p99 (ms) | recall@10 vs exact | "
          "tuning recall@10 | peak memory (GiB) | held (B/vector) | saved (B/vector) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {params['kind']} | {', '.join(f'{k}={v}' for k, v in shown.items()) or '-'} | "
          f"{params.get('build_seconds', 0):.1f} | {params.get('tune_seconds', 0):.1f} | "
          f"{np.percentile(ms, 50):.2f} | {np.percentile(ms, 99):.2f} | {recall_at(np.array(found), truth):.3f} | "
          f"{params.get('recall_at_10', '-')} | {peak:.2f} | {held * GIB / args.n:.0f} | {saved / args.n:.0f} |")
    if args.n <= 2_000_000:  # the whole matrix in memory: only where it fits comfortably
        array = vectors.load()
        exact_single = []
        for query in queries[:10]:
            tic = time.perf_counter()
            exact_search(array, query[None], args.k)
            exact_single.append(time.perf_counter() - tic)
        print(f"| exact (reference) | torch matmul + top-k, in memory | - | - | {np.median(exact_single) * 1000:.2f} | "
              f"{np.max(exact_single) * 1000:.2f} (max of 10) | 1.000 | - | - | {4 * args.dim} | - |")
    print(f"\nexact, one streamed pass over the file for all {len(queries)} queries: {exact_batch_ms:.2f} ms a query")


if __name__ == "__main__":
    main()
