"""Peak memory and time of one forward+backward of the contrastive loss: plain vs tiled (CPU, fp32).

Run:  python benchmarks/loss_memory.py [--batches 4096 16384 32768] [--dim 512] [--chunk 1024] [--repeats N]
Each (batch, mode) runs in a fresh subprocess, since a process's peak RSS (VmHWM) cannot be reset. Peak
is reported above the RSS after the inputs were allocated and one small warm-up step ran, so it counts
the loss's own memory plus the feature gradients (2 x batch x dim floats, the same in both modes). The
subprocess caps its address space below the free memory so an oversized plain run fails with an
allocation error (reported as OOM) instead of inviting the kernel's OOM killer onto other processes.
Time is the best of the timed steps (default: 5 up to batch 4096, 2 up to 16384, then 1): on a shared
machine the minimum is the least disturbed estimate.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise KeyError("MemAvailable")


def worker(batch: int, dim: int, chunk: int | None, repeats: int) -> dict:
    """One configuration, in this (fresh) process: peak MiB above inputs and best seconds."""
    import torch
    import torch.nn.functional as F

    from clipforge.loss import ContrastiveLoss

    # Leave 1.5 GiB of what is free to everyone else; RLIMIT_AS counts virtual size, hence the offset.
    budget = max(_available_kib() - 1536 * 1024, 1 << 20) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (_status_kib("VmSize") * 1024 + budget, resource.RLIM_INFINITY))
    loss_fn = ContrastiveLoss(chunk_size=chunk)

    def step(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor) -> None:
        loss_fn(image, text, log_scale.exp()).backward()

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        image = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
        text = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
        return image, text, torch.tensor(4.6, requires_grad=True)

    step(*inputs(256))  # thread pools and kernels, so their memory is not charged to the loss
    args = inputs(batch)
    base_kib = _status_kib("VmRSS")
    times, peak_kib = [], 0
    try:
        for _ in range(repeats):
            for t in args:
                t.grad = None
            start = time.perf_counter()
            step(*args)
            times.append(time.perf_counter() - start)
            # The first step's peak: later ones add allocator fragmentation, not loss memory.
            peak_kib = peak_kib or _status_kib("VmHWM") - base_kib
    except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
        return {"status": "oom", "error": str(err).splitlines()[0][:120], "limit_mib": budget >> 20}
    return {"status": "ok", "peak_mib": peak_kib / 1024, "seconds": min(times)}


def run_config(batch: int, dim: int, chunk: int | None, repeats: int) -> dict:
    """Run one configuration in a subprocess and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", "--batches", str(batch), "--dim", str(dim),
           "--chunk", str(chunk or 0), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "oom" if proc.returncode < 0 else "error", "error": proc.stderr.strip()[-200:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=None, help="tiled chunk size (default: DEFAULT_CHUNK_SIZE)")
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per config, best taken (0: by batch)")
    parser.add_argument("--modes", nargs="+", default=["plain", "tiled"], choices=["plain", "tiled"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.batches[0], args.dim, args.chunk or None, args.repeats)))
        return
    import torch

    from clipforge.loss import DEFAULT_CHUNK_SIZE

    chunk = args.chunk or DEFAULT_CHUNK_SIZE
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, d={args.dim}, tiled chunk={chunk}, "
          "forward+backward (best of repeats); peak = VmHWM above inputs (incl. feature grads)")
    print(f"{'batch':>6} {'mode':>6} {'peak MiB':>10} {'seconds':>9}")
    results: dict[tuple[int, str], dict] = {}
    for batch in args.batches:
        for mode in args.modes:
            repeats = args.repeats or (5 if batch <= 4096 else 2 if batch <= 16384 else 1)
            res = run_config(batch, args.dim, chunk if mode == "tiled" else None, repeats)
            results[batch, mode] = res
            if res["status"] == "ok":
                print(f"{batch:>6} {mode:>6} {res['peak_mib']:>10.0f} {res['seconds']:>9.2f}", flush=True)
            else:
                note = f" (address-space cap {res['limit_mib']} MiB)" if "limit_mib" in res else ""
                print(f"{batch:>6} {mode:>6} {res['status'].upper():>10} {'-':>9}{note}", flush=True)
    if set(args.modes) == {"plain", "tiled"}:
        print(f"\n{'batch':>6} {'memory plain/tiled':>19} {'time tiled/plain':>17}")
        for batch in args.batches:
            plain, tiled = results[batch, "plain"], results[batch, "tiled"]
            if plain["status"] == tiled["status"] == "ok":
                mem = plain["peak_mib"] / max(tiled["peak_mib"], 1e-9)
                print(f"{batch:>6} {mem:>18.1f}x {tiled['seconds'] / plain['seconds']:>16.2f}x")
            else:
                print(f"{batch:>6} {'plain ' + plain['status'].upper():>19} {'-':>17}")


if __name__ == "__main__":
    main()
