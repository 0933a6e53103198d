"""`clipforge demo` (interim main job until training lands): load a reference checkpoint, prove
format round trips, zero-shot classify images with prompt ensembling, and measure throughput."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from clipforge.timing import median_seconds

LABELS = ["dog", "cat", "rocket", "red circle", "blue square", "green triangle", "thermometer", "coffee cup",
          "bicycle", "mountain", "emoji face", "letter A"]


def find_reference_checkpoint() -> Path | None:
    """The open_clip-made fixture checkpoint shipped beside the repo, if any."""
    roots = [os.environ.get("CLIPFORGE_FIXTURES", ""), "../shared/fixtures", str(Path(__file__).resolve().parents[4] / "shared" / "fixtures")]
    for root in filter(None, roots):
        candidate = Path(root) / "openai-vit-tiny" / "openai_state_dict.safetensors"
        if candidate.is_file():
            return candidate
    return None


def synthetic_images(out: Path) -> list[Path]:
    """A few drawn shapes, so the demo has inputs on any machine."""
    shapes = {"red_circle": ("ellipse", "red"), "blue_square": ("rectangle", "blue"), "green_triangle": ("polygon", "green")}
    paths = []
    for name, (kind, color) in shapes.items():
        image = Image.new("RGB", (96, 96), "white")
        draw = ImageDraw.Draw(image)
        if kind == "polygon":
            draw.polygon([(48, 10), (86, 86), (10, 86)], fill=color)
        else:
            getattr(draw, kind)([16, 16, 80, 80], fill=color)
        paths.append(out / f"{name}.png")
        image.save(paths[-1])
    return paths


def _throughput(model, pixels, tokens, repeats: int = 5) -> tuple[float, float]:
    return (len(pixels) / median_seconds(lambda: model.encode_image(pixels), repeats),
            len(tokens) / median_seconds(lambda: model.encode_text(tokens), repeats))


def run(args: argparse.Namespace) -> None:
    """Run the interim demo and write report.md + results.json to --out."""
    import clipforge
    from clipforge.evaluate import OPENAI_TEMPLATES_7, build_classifier, classify

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    source = args.model or find_reference_checkpoint() or "ViT-B-32"
    start = time.perf_counter()
    model, preprocess = clipforge.load(source)
    tokenizer = clipforge.get_tokenizer(source, context_length=model.context_length)
    load_s = time.perf_counter() - start
    images = synthetic_images(out / "images")
    if isinstance(source, Path):
        images += sorted(source.parent.glob("image*.png"))
    pixels = torch.stack([preprocess(p) for p in images])
    tokens = tokenizer([f"a photo of a {label}." for label in LABELS])
    print(f"loaded {source} in {load_s:.2f} s: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    with torch.inference_mode():
        reference = (model.encode_image(pixels), model.encode_text(tokens))
    roundtrip = {}
    for fmt in ("clipforge", "hf") if not model.config.vision.is_resnet else ("clipforge",):
        directory = clipforge.save_pretrained(model, out / f"checkpoint-{fmt}", format=fmt, tokenizer=tokenizer)
        again, _ = clipforge.load(directory)
        with torch.inference_mode():
            diff = max((again.encode_image(pixels) - reference[0]).abs().max().item(),
                       (again.encode_text(tokens) - reference[1]).abs().max().item())
        roundtrip[fmt] = diff
        print(f"saved as {fmt} in {directory} and reloaded: max |diff| of embeddings {diff:.2e}")

    classifier = build_classifier(model, tokenizer, LABELS, OPENAI_TEMPLATES_7)
    probs = classify(model, pixels, classifier)
    predictions = []
    print(f"\nzero-shot, {len(LABELS)} labels x {len(OPENAI_TEMPLATES_7)} ensembled templates "
          "(random-weight reference model: predictions show the pipeline, not accuracy)")
    print("| image | top-3 |\n|---|---|")
    for path, row in zip(images, probs):
        top = row.topk(3)
        pred = [(LABELS[i], round(p, 4)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        predictions.append({"image": path.name, "top3": pred})
        print(f"| {path.name} | " + ", ".join(f"{label} {p:.3f}" for label, p in pred) + " |")

    speed = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cast = model.to(dtype)
        speed[precision] = _throughput(cast, pixels.to(dtype), tokens)
    model.float()
    print("\n| precision | images/s | texts/s |\n|---|---|---|")
    for precision, (img, txt) in speed.items():
        print(f"| {precision} | {img:.0f} | {txt:.0f} |")

    results = {"model": str(source), "load_seconds": load_s, "roundtrip_max_abs_diff": roundtrip,
               "predictions": predictions, "throughput": {k: {"images_per_s": v[0], "texts_per_s": v[1]} for k, v in speed.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"# clipforge demo\n\nModel: `{source}`\n", "## Format round trips (max abs embedding diff)\n",
             *[f"- {k}: {v:.2e}" for k, v in roundtrip.items()], "\n## Zero-shot (ensembled prompts)\n",
             "| image | top-3 |", "|---|---|",
             *[f"| {p['image']} | " + ", ".join(f"{a} {b:.3f}" for a, b in p["top3"]) + " |" for p in predictions],
             "\n## Throughput\n", "| precision | images/s | texts/s |", "|---|---|---|",
             *[f"| {k} | {v[0]:.0f} | {v[1]:.0f} |" for k, v in speed.items()]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out / 'report.md'} and {out / 'results.json'}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge demo`."""
    p = sub.add_parser("demo", help="end-to-end demo: load, round-trip, zero-shot classify, benchmark")
    p.add_argument("--model", default=None, help="checkpoint or registry name (default: the reference fixture)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.set_defaults(func=run)
