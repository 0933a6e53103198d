"""The matmul limit of a ViT image tower: its FLOPs over the best rate this CPU reaches on each of its shapes.

Run:  python benchmarks/matmul_limit.py [--model ViT-B-32] [--batch 16] [--dtype bf16] [--repeats 9]
Prints, per distinct matmul shape of one forward pass (patch embedding, q/k/v, attention, output
projection, MLP, the class-token-only last block, the final projection): how often it runs, its GFLOP,
the best GFLOP/s measured for that shape alone (the faster of `F.linear` and `torch.mm` on contiguous
operands, the fastest of repeats: a limit, where model timings are medians), and the time the model
spends in it at that rate. The sum is the fastest the tower can run if everything that is not a matmul
were free: benchmarks/inference.py divides it by the measured time ("% of matmul limit").
`inference.py` imports `matmul_limit`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import clipforge
from clipforge.timing import call_seconds


@dataclass(frozen=True)
class Shape:
    """One matmul: `count` x ([batch] x [m, k] @ [k, n])."""

    name: str
    m: int
    k: int
    n: int
    batch: int = 1
    count: int = 1

    @property
    def gflop(self) -> float:
        """Multiply-adds x 2, over every run of this shape in one forward pass."""
        return 2 * self.m * self.k * self.n * self.batch * self.count / 1e9


def vit_shapes(model_name: str, images: int) -> list[Shape]:
    """Every matmul of one image-tower forward pass of a registry ViT on `images` images."""
    vision = clipforge.get_model_config(model_name).vision
    width, hidden, heads = vision.width, round(vision.width * vision.mlp_ratio), vision.heads
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens, rows, layers = patches + 1, images * (patches + 1), vision.layers
    head = width // heads
    out_dim = clipforge.get_model_config(model_name).embed_dim
    if vision.pool == "map":  # SigLIP: no class token, every layer on every token, then the attention-pool head
        return _siglip_shapes(images, patches, width, hidden, heads, vision.patch_size, layers)
    return [
        Shape("patch embedding", images * patches, 3 * vision.patch_size**2, width),
        Shape("q, k, v", rows, width, 3 * width, count=layers - 1),
        Shape("attention q.k", tokens, head, tokens, batch=images * heads, count=layers - 1),
        Shape("attention w.v", tokens, tokens, head, batch=images * heads, count=layers - 1),
        Shape("attention out", rows, width, width, count=layers - 1),
        Shape("MLP up", rows, width, hidden, count=layers - 1),
        Shape("MLP down", rows, hidden, width, count=layers - 1),
        Shape("last block k, v", rows, width, 2 * width),
        Shape("last block class token", images, width, 2 * width + 2 * hidden),  # q, out, MLP up and down
        Shape("projection", images, width, out_dim),
    ]


def _siglip_shapes(images: int, patches: int, width: int, hidden: int, heads: int, patch: int,
                   layers: int) -> list[Shape]:
    """The matmuls of a SigLIP image tower: full blocks, then the probe's attention and MLP (no projection)."""
    rows, head = images * patches, width // heads
    return [
        Shape("patch embedding", rows, 3 * patch**2, width),
        Shape("q, k, v", rows, width, 3 * width, count=layers),
        Shape("attention q.k", patches, head, patches, batch=images * heads, count=layers),
        Shape("attention w.v", patches, patches, head, batch=images * heads, count=layers),
        Shape("attention out", rows, width, width, count=layers),
        Shape("MLP up", rows, width, hidden, count=layers),
        Shape("MLP down", rows, hidden, width, count=layers),
        Shape("attention pool k, v", rows, width, 2 * width),
        Shape("attention pool probe", images, width, 2 * width + 2 * hidden),  # q, out, MLP up and down
    ]


def fastest_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one warm-up call."""
    return min(call_seconds(fn, repeats))


def best_seconds(shape: Shape, dtype: torch.dtype, repeats: int) -> float:
    """The fastest time of one run of `shape` (F.linear or torch.mm / bmm, contiguous operands)."""
    with torch.inference_mode():
        if shape.batch > 1:
            a = torch.randn(shape.batch, shape.m, shape.k, dtype=dtype)
            b = torch.randn(shape.batch, shape.k, shape.n, dtype=dtype)
            return fastest_seconds(lambda: torch.bmm(a, b), repeats)
        x, w = torch.randn(shape.m, shape.k, dtype=dtype), torch.randn(shape.n, shape.k, dtype=dtype)
        wt = w.t().contiguous()
        return min(fastest_seconds(lambda: F.linear(x, w), repeats), fastest_seconds(lambda: torch.mm(x, wt), repeats))


def matmul_limit(model_name: str, images: int, dtype: torch.dtype, repeats: int) -> tuple[float, list[tuple]]:
    """(seconds, rows): the tower's matmul time at each shape's best rate, and a row per shape."""
    rows, total = [], 0.0
    for shape in vit_shapes(model_name, images):
        seconds = best_seconds(shape, dtype, repeats)
        one = shape.gflop / shape.count
        rows.append((shape, one / seconds, seconds * shape.count))
        total += seconds * shape.count
    return total, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    total, rows = matmul_limit(args.model, args.batch, dtype, args.repeats)
    gflop = sum(shape.gflop for shape, _, _ in rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} image tower, "
          f"{args.batch} images, {args.dtype}\n")
    print("| matmul | shape | runs | GFLOP | best GFLOP/s | ms at best |")
    print("|---|---|---|---|---|---|")
    for shape, rate, seconds in rows:
        dims = f"{shape.batch}x" if shape.batch > 1 else ""
        print(f"| {shape.name} | {dims}{shape.m}x{shape.k}x{shape.n} | {shape.count} | {shape.gflop:.1f} | "
              f"{rate:.0f} | {seconds * 1e3:.1f} |")
    print(f"\n{gflop:.1f} GFLOP; matmul limit {total * 1e3:.0f} ms ({gflop / total:.0f} GFLOP/s overall)")


if __name__ == "__main__":
    main()
