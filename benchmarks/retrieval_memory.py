"""Peak memory and time of chunked retrieval recall at 100k images x 100k captions (d=64).

The dense fp32 similarity matrix alone would be 40 GB; the chunked pass keeps a running top-k instead.
CPU: extra peak = ru_maxrss after the run minus ru_maxrss before it (this process does nothing else).
CUDA: torch.cuda.max_memory_allocated above the features already resident.

    .venv/bin/python benchmarks/retrieval_memory.py [--n 100000] [--dim 64] [--chunk 4096] [--device cpu]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from clipforge.evaluate.retrieval import retrieval_recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(args.n, args.dim, generator=gen), dim=-1).to(device)
    texts = F.normalize(torch.randn(args.n, args.dim, generator=gen), dim=-1).to(device)
    text_to_image = torch.arange(args.n, device=device)
    retrieval_recall(images[:200], texts[:200], text_to_image[:200], chunk_size=args.chunk)  # warm-up, tiny blocks
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = retrieval_recall(images, texts, text_to_image, chunk_size=args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - start
    dense = args.n * args.n * 4
    print("| N images = N texts | dim | chunk | device | time (s) | extra peak (MiB) | dense matrix (MiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.n} | {args.dim} | {args.chunk} | {device} | {seconds:.1f} | {peak / 2**20:.0f} "
          f"| {dense / 2**20:.0f} |")
    print("recall (random features, so near chance):", {k: round(v, 6) for k, v in result.items()})


if __name__ == "__main__":
    main()
