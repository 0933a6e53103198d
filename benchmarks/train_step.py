"""Training-step throughput: clipforge vs HF transformers CLIPModel on the same small config.

Run:  python benchmarks/train_step.py [--steps 10] [--batch 64]
      python benchmarks/train_step.py --trainer-data runs/demo/train.csv [--steps 30]   # the data path
Config: vision width 256, 6 layers, patch 16, 64 px; text width 256, 6 layers, context 32; embed 256
(about 22.5M parameters); fused AdamW for both; captions of realistic length padded to 32. Each variant runs in its
own subprocess so peak RSS is its own. Prints ms/step (median), pairs/s, peak RSS and ratios vs HF.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = [("hf", "fp32"), ("clipforge", "fp32"), ("hf", "bf16-autocast"), ("hf", "bf16-cast"),
            ("clipforge", "bf16-autocast"), ("clipforge", "bf16")]


def hf_model():
    """HF CLIPModel with the benchmark config."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=6,
                         max_position_embeddings=32),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=6,
                           image_size=64, patch_size=16),
        projection_dim=256)
    if "attn_implementation" in CLIPModel.__init__.__code__.co_varnames:
        return CLIPModel(config, attn_implementation="sdpa")
    return CLIPModel(config)


def run_variant(impl: str, precision: str, batch: int, steps: int) -> dict:
    """Time `steps` optimizer steps (after 3 warm-up steps) in this process."""
    import torch

    torch.manual_seed(0)
    pixels = torch.randn(batch, 3, 64, 64)
    tokens = torch.zeros(batch, 32, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for row in range(batch):
        n = int(torch.randint(6, 18, (1,), generator=gen))
        tokens[row, 0], tokens[row, 1 : n + 1], tokens[row, n + 1] = (
            49406, torch.randint(1, 49000, (n,), generator=gen), 49407)
    if impl == "hf":
        model = hf_model().train()
        if precision == "bf16-cast":
            model = model.to(torch.bfloat16)
            pixels = pixels.bfloat16()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
                loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
            loss.backward()
            opt.step()
    else:
        import clipforge
        from clipforge.distributed import DistInfo
        from clipforge.loss import ContrastiveLoss
        from clipforge.train.step import TrainStep

        model = clipforge.create_model("cpu-vit-small-64", quick_gelu=True).train()
        mode = "bf16" if precision == "bf16" else "fp32"
        train_step = TrainStep(model, ContrastiveLoss(), mode, 1, 0.0, DistInfo())
        opt = torch.optim.AdamW(train_step.optim_params(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
        if mode == "bf16":
            pixels = pixels.bfloat16()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
                train_step(pixels, tokens)
            opt.step()
            train_step.sync_model()
    params = sum(p.numel() for p in model.parameters())
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"impl": impl, "precision": precision, "ms": seconds * 1e3, "pairs_per_s": batch / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": params}


def trainer_data_rows(csv: str, steps: int) -> None:
    """Seconds per step of the library trainer at the demo's CLIP settings: PIL decoding in DataLoader
    workers vs the decoded-image cache (built by a first short run, so only its reuse is timed)."""
    import tempfile

    from clipforge.demo.config import DemoConfig
    from clipforge.demo.training import train_config
    from clipforge.train.trainer import train

    demo = DemoConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("PIL in DataLoader workers", {}),
                             ("decoded cache, tensor augmentation", {"decoded_cache": True, "workers": 0,
                                                                     "decoded_cache_dir": f"{tmp}/cache"})):
            warm = train_config(demo, csv, f"{tmp}/warm-{len(rows)}", 2)
            train(type(warm)(**{**warm.__dict__, **extra, "save_every": 0}))
            config = train_config(demo, csv, f"{tmp}/run-{len(rows)}", steps)
            summary = train(type(config)(**{**config.__dict__, **extra}))
            rows.append((label, summary["seconds"] / steps))
    print(f"trainer, demo CLIP settings ({demo.model}, batch {demo.batch_size}, {demo.precision}), {steps} steps, "
          f"{csv}")
    print("| data path | s/step | speed vs PIL |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {rows[0][1] / seconds:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--trainer-data", default="", help="a caption CSV: time the trainer's data paths on it")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_data:
        trainer_data_rows(args.trainer_data, args.steps)
        return
    if args.worker:
        print(json.dumps(run_variant(*args.worker, args.batch, args.steps)))
        return
    results = []
    for impl, precision in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", impl, precision, "--batch", str(args.batch),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    hf = {r["precision"]: r for r in results if r["impl"] == "hf"}
    best_hf_bf16 = min((r for p, r in hf.items() if p.startswith("bf16")), key=lambda r: r["ms"])
    print(f"batch {args.batch}, median of {args.steps} steps; params: HF {hf['fp32']['params'] / 1e6:.2f}M, "
          f"clipforge {results[1]['params'] / 1e6:.2f}M")
    print("| impl | precision | ms/step | pairs/s | peak RSS MiB | speed vs HF (same precision family) | RSS vs HF |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ref = hf["fp32"] if r["precision"] == "fp32" else best_hf_bf16
        speed = f"{ref['ms'] / r['ms']:.2f}x" if r["impl"] == "clipforge" else ""
        rss = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x" if r["impl"] == "clipforge" else ""
        print(f"| {r['impl']} | {r['precision']} | {r['ms']:.0f} | {r['pairs_per_s']:.0f} | {r['peak_rss_mib']:.0f} "
              f"| {speed} | {rss} |")
    print("bf16 rows are compared with the faster HF bf16 variant.")


if __name__ == "__main__":
    main()
