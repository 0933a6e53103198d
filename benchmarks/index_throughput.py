"""`clipforge index` end to end against the pure model throughput on the same batches (ViT-B-32).

Run:  python benchmarks/index_throughput.py [--images 2000] [--batch 64] [--precision fp32] [--workers 0,1,2]
Generates JPEG photos (500x375, crops of the real photos scikit-learn ships, quality 90), then prints a
table: images/s of the model alone on pre-decoded pixels (the same batches), of decoding alone, and of
`build_index` with each number of decoding workers, with the ratio of each build to the model alone.
Run it on a quiet machine: other processes on the cores change every row.
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import clipforge
from clipforge.data.images import decode_image
from clipforge.search import build_index


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 500x375 JPEGs: random crops, flips and scales of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(array) for array in load_sample_images().images]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = sources[i % len(sources)]
        scale = rng.uniform(0.6, 1.0)
        width, height = int(photo.width * scale), int(photo.height * scale)
        left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
        crop = photo.crop((left, top, left + width, top + height)).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        paths.append(folder / f"photo_{i:05d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


def model_alone(model: torch.nn.Module, pixels: torch.Tensor, batch: int, precision: str) -> float:
    """Seconds for the model to embed all pre-decoded pixels in batches of `batch` (what build_index calls)."""
    from clipforge.inference.features import extract_image_features

    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        extract_image_features(model, pixels[i : i + batch], batch_size=batch, precision=precision)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to build with")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clipforge-index-bench-"))
    try:
        paths = make_photos(root / "photos", args.images)
        model = clipforge.create_model("ViT-B-32", seed=0).eval()
        clipforge.save_pretrained(model, root / "model")
        model, preprocess = clipforge.load(root / "model")
        start = time.perf_counter()
        pixels = torch.stack([preprocess(decode_image(p)) for p in paths])
        decode_s = time.perf_counter() - start
        with torch.inference_mode():
            model_alone(model, pixels[: args.batch], args.batch, args.precision)  # warm-up: oneDNN primitives
            model_s = model_alone(model, pixels, args.batch, args.precision)
        rows = [("model alone (pre-decoded pixels)", model_s), ("decode + preprocess alone (1 process)", decode_s)]
        for workers in [int(w) for w in args.workers.split(",")]:
            out = root / f"index-{workers}"
            start = time.perf_counter()
            stats = build_index(root / "photos", out, model=root / "model", batch_size=args.batch, progress=False,
                                precision=args.precision, workers=workers, backend="exact")
            rows.append((f"clipforge index, {workers} decoding workers", time.perf_counter() - start))
            assert stats.total == args.images
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ViT-B-32 {args.precision}; "
              f"{args.images} JPEGs 500x375; batch {args.batch}")
        print("\n| what | seconds | images/s | vs model alone |\n|---|---|---|---|")
        for label, seconds in rows:
            print(f"| {label} | {seconds:.1f} | {args.images / seconds:.1f} | {model_s / seconds:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
