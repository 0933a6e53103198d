"""The demo's compute-optimal recipe: which data mix, image tower, temperature and batch learn the most held-out
accuracy per second of CPU training, at the precision `auto` picks here.

Run:  python benchmarks/recipe.py [--variants baseline,emoji-only,...] [--out runs/recipe]
Each variant trains the demo's CLIP (or LiT) with the library trainer on the demo's own data (built as the demo
builds it, seed 0), then scores zero-shot top-1 (the demo's prompt ensemble) on the held-out twitter style:
seen concepts (1,282-way) and unseen concepts. Appends each result to OUT/recipe.jsonl, then prints a markdown
table of every row there (seconds, top-1, top-1 per training minute, ratio against the first row) and plots them
in OUT/recipe.png (top-1 against training seconds). Run it alone on the machine: the seconds are wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from clipforge.data.labelled import LabelledImages, load_labelled_images
from clipforge.demo.config import DemoConfig
from clipforge.demo.data import prepare_datasets, read_concepts
from clipforge.demo.evaluation import accuracy, embed_all
from clipforge.demo.run import choose_id_test, training_tables
from clipforge.demo.training import run_contrastive, train_config
from clipforge.device import resolve_device
from clipforge.inference.templates import get_templates
from clipforge.precision import machine_key, resolve_precision

# name -> (DemoConfig fields, TrainConfig fields, text tower). Steps are fixed so a variant repeats exactly.
VARIANTS = {
    "baseline": ({}, {"steps": 700}, "clip"),  # the demo's data (emoji x2 + 8.4k icons) at the old 700 steps
    "emoji-only": ({"icons": 0}, {"steps": 700}, "clip"),
    "icons-2k": ({"icons": 2000}, {"steps": 700}, "clip"),
    "emoji-only-t30": ({"icons": 0}, {"steps": 700, "model_overrides": {"logit_scale_init": 3.4012}}, "clip"),
    "emoji-only-w48": ({"icons": 0}, {"steps": 700, "model_overrides": {"vision.width": 48}}, "clip"),
    "emoji-only-b128": ({"icons": 0}, {"steps": 1400, "batch_size": 128}, "clip"),
    "emoji-only-lr2e-3": ({"icons": 0}, {"steps": 700, "lr": 2e-3}, "clip"),
    "emoji-only-1400": ({"icons": 0}, {"steps": 1400}, "clip"),
    # a ViT image tower at the demo's 32 px: 4-pixel patches (64 tokens) keep its matmuls large; steps for ~the time
    "emoji-only-vit-p4": ({"icons": 0}, {"steps": 300, "model_overrides": {
        "vision.layers": 4, "vision.width": 192, "vision.heads": 3, "vision.patch_size": 4}}, "clip"),
    "lit-318": ({"icons": 0}, {"steps": 318}, "minilm"),
    "lit-600": ({"icons": 0}, {"steps": 600}, "minilm"),
}


def build_tables(cfg: DemoConfig, out: Path) -> Path:
    """The demo's training CSV for this data setting, under OUT/data-<icons>."""
    data = prepare_datasets(cfg.data_dir(), cache=cfg.cache_dir(), icons=cfg.icons > 0, styles=cfg.styles("built"))
    concepts = read_concepts(data.emoji)
    folder = out / f"data-{cfg.icons}"
    folder.mkdir(parents=True, exist_ok=True)
    return training_tables(cfg, data, concepts, choose_id_test(concepts, cfg.styles("train"), cfg.seed), folder).clip


def run_variant(name: str, out: Path, images: LabelledImages) -> dict:
    """Train one variant, score it on twitter (seen and unseen concepts)."""
    demo_fields, train_fields, tower = VARIANTS[name]
    cfg = dataclasses.replace(DemoConfig(), **demo_fields)
    # resolved for the device the runs train on (TrainConfig device "auto"), as the demo does
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, resolve_device("auto")).precision)
    table = build_tables(cfg, out)
    config = dataclasses.replace(train_config(cfg, table, out / name, train_fields["steps"], text_tower=tower),
                                 **train_fields)
    torch.manual_seed(cfg.seed)
    trained = run_contrastive(name, config)
    ev = embed_all(name, trained.model, trained.tokenizer, trained.preprocess, images)
    ensemble = get_templates(cfg.templates)
    seen, unseen = (accuracy(ev, split, "twitter", ensemble)["top1"] for split in ("seen", "unseen"))
    return {"variant": name, "precision": cfg.precision, "steps": trained.steps, "seconds": round(trained.seconds, 1),
            "gflop_per_step": trained.step_gflop, "twitter_seen": round(seen, 4), "twitter_unseen": round(unseen, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--out", default="runs/recipe", help="appends to OUT/recipe.jsonl; the table shows all of it")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    everything = load_labelled_images(DemoConfig().data_dir() / "emoji")
    images = everything.subset([d == "twitter" for d in everything.domains])
    log = out / "recipe.jsonl"
    for name in names:
        row = run_variant(name, out, images)
        with open(log, "a") as file:
            file.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # the whole study so far
    print_table(rows)
    plot(rows, out / "recipe.png")


def print_table(rows: list[dict]) -> None:
    """Markdown table with top-1 per training minute and ratios against the first row."""
    print(f"machine: {machine_key()}")
    print("| variant | precision | steps | train s | twitter seen top-1 | unseen top-1 | seen top-1 per min "
          "| vs first |")
    print("|---|---|---|---|---|---|---|---|")
    first = rows[0]["twitter_seen"] / rows[0]["seconds"]
    for r in rows:
        rate = r["twitter_seen"] / r["seconds"]
        print(f"| {r['variant']} | {r['precision']} | {r['steps']} | {r['seconds']:.0f} | {r['twitter_seen']:.3f} | "
              f"{r['twitter_unseen']:.3f} | {60 * rate:.3f} | {rate / first:.2f}x |")


def plot(rows: list[dict], path: Path) -> None:
    """Twitter seen top-1 against training seconds, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["seconds"], r["twitter_seen"])
        ax.annotate(r["variant"], (r["seconds"], r["twitter_seen"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("held-out twitter, seen concepts: top-1")
    ax.set_title("demo recipe: held-out accuracy against training time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
