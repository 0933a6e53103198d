"""GPU training throughput and MFU: ViT-B-16 CLIP, bf16, at the largest batch that fits.

Run (on a CUDA machine):  python benchmarks/gpu_train_step.py [--batches 256 512 1024 2048] [--steps 10]
Prints a table: batch, ms/step, pairs/s, achieved TFLOP/s and MFU vs the card's dense bf16 peak.
Two paths per batch: clipforge's bf16 weights + fp32 master (TrainStep) and autocast bf16 (fp32 weights).
FLOPs are counted analytically (matmuls + attention, forward x3 for forward+backward).
"""
from __future__ import annotations

import argparse
import time

import torch

import clipforge
from clipforge.distributed import DistInfo
from clipforge.loss import ContrastiveLoss
from clipforge.train.step import TrainStep

PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(name: str) -> float:
    """Dense bf16 peak of the card, from its name."""
    if "H100" in name and "PCIe" in name:
        return PEAK_BF16_TFLOPS["H100 PCIe"]
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return float("nan")


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one sequence through a transformer stack (2 per multiply-add)."""
    per_layer = 2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width
    return layers * per_layer


def clip_flops_per_pair(model: clipforge.CLIP, text_tokens: int) -> float:
    """Forward FLOPs per image-text pair for a ViT CLIP."""
    v, t = model.config.vision, model.config.text
    patches = (v.image_size // v.patch_size) ** 2
    image = transformer_flops(patches + 1, v.width, v.layers, v.mlp_ratio)
    image += 2 * patches * (3 * v.patch_size**2) * v.width + 2 * v.width * model.config.embed_dim
    text = transformer_flops(text_tokens, t.width, t.layers, t.mlp_ratio) + 2 * t.width * model.config.embed_dim
    return image + text


def measure(model, batch: int, steps: int, mode: str, device: torch.device, text_len: int) -> float:
    """Median seconds per optimizer step."""
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    tokens = torch.randint(1, 49000, (batch, 77), device=device)
    tokens[:, 0], tokens[:, text_len - 1], tokens[:, text_len:] = 49406, 49407, 0
    loss_fn = ContrastiveLoss().to(device)
    if mode.endswith("+compile"):
        model.visual.compile()
        model.text_tower.transformer.compile()
    if mode.startswith("bf16-weights"):
        step = TrainStep(model, loss_fn, "bf16", 1, 0.0, DistInfo(device=device))
        opt = torch.optim.AdamW(step.optim_params(), lr=1e-4, fused=True)

        def run():
            step(pixels.bfloat16(), tokens)
            opt.step()
            step.sync_model()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def run():
            for p in params:
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                image = model.encode_image(pixels, normalize=True).float()
                text = model.encode_text(tokens, normalize=True).float()
            loss_fn(image, text, model.logit_scale.exp()).backward()
            opt.step()
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=20, help="real tokens per caption incl. SOT/EOT")
    parser.add_argument("--modes", nargs="+", default=["bf16-weights", "autocast"],
                        help="bf16-weights, autocast, or either with +compile (torch.compile'd towers)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks: larger batches fit")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    print(f"{name}; torch {torch.__version__}; ViT-B-16 CLIP; text {args.text_len} tokens; peak bf16 {peak} TFLOP/s; "
          f"grad checkpointing {'on (recompute not counted in MFU)' if args.grad_checkpointing else 'off'}")
    print("| mode | batch | ms/step | pairs/s | TFLOP/s | MFU | peak mem GiB |\n|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for batch in args.batches:
            torch.manual_seed(0)
            model = clipforge.create_model("ViT-B-16").to(device).train()
            model.set_grad_checkpointing(args.grad_checkpointing)
            flops = 3 * clip_flops_per_pair(model, args.text_len) * batch
            torch.cuda.reset_peak_memory_stats()
            try:
                seconds = measure(model, batch, args.steps, mode, device, args.text_len)
            except torch.cuda.OutOfMemoryError:
                print(f"| {mode} | {batch} | OOM | | | | |")
                del model
                torch.cuda.empty_cache()
                break
            tflops = flops / seconds / 1e12
            mem = torch.cuda.max_memory_allocated() / 2**30
            print(f"| {mode} | {batch} | {seconds * 1e3:.0f} | {batch / seconds:.0f} | {tflops:.0f} | "
                  f"{tflops / peak:.1%} | {mem:.1f} |", flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
