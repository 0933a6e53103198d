"""The demo's three training runs: CLIP from scratch, LiT (locked pretrained MiniLM) and a supervised baseline."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clipforge.checkpoint.io import get_tokenizer, load
from clipforge.data.transforms import EvalTransform, TrainTransform
from clipforge.demo.config import DemoConfig
from clipforge.evaluate.datasets import decode_all
from clipforge.evaluate.supervised import train_supervised
from clipforge.model import create_model
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train

# Light augmentation shared by all three runs (the supervised baseline gets the same views as CLIP).
# Measured (CLIP, 300 steps): crops down to 50% of the area + jitter 0.3 gave 22% held-out top-1,
# 80% + 0.1 gave 27%, none 27.5%: in a few minutes the model underfits, so strong augmentation costs.
AUG_SCALE_MIN = 0.8
AUG_COLOR_JITTER = 0.1


@dataclass
class TrainedModel:
    """A finished run: the model (fp32, eval mode), its tokenizer, where it lives and how long it took."""

    name: str
    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable
    checkpoint: Path
    metrics: Path
    seconds: float
    steps: int


def train_config(cfg: DemoConfig, train_csv: Path, out: Path, steps: int, text_tower: str = "clip") -> TrainConfig:
    """The TrainConfig of the CLIP (text_tower "clip") or LiT (text_tower "minilm", locked) run."""
    return TrainConfig(
        model=cfg.model, text_tower=text_tower, lock_text=text_tower == "minilm", train_data=str(train_csv),
        key_column="key", caption_separator="|", aug_scale_min=AUG_SCALE_MIN, aug_color_jitter=AUG_COLOR_JITTER,
        workers=cfg.workers, batch_size=cfg.batch_size, steps=steps, lr=cfg.lr, warmup=min(cfg.warmup, steps // 4),
        weight_decay=0.1, precision=cfg.precision, seed=cfg.seed, output_dir=str(out), log_every=1, keep_last=1,
    )


def run_contrastive(name: str, config: TrainConfig) -> TrainedModel:
    """Train with the library trainer (checkpoints, metrics.jsonl) and load the result for evaluation."""
    start = time.perf_counter()
    summary = train(config)
    seconds = time.perf_counter() - start
    checkpoint = Path(summary["checkpoint"])
    model, preprocess = load(checkpoint)
    model.eval()
    tokenizer = get_tokenizer(checkpoint, context_length=model.context_length)
    return TrainedModel(name, model, tokenizer, preprocess, checkpoint, Path(config.output_dir) / "metrics.jsonl",
                        seconds, summary["steps"])


class _AugmentedImages(Dataset):
    """(pixels, label) with the training augmentation, re-drawn every time an item is read."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: TrainTransform) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.paths[index]), self.labels[index]


def read_training_rows(train_csv: Path, classnames: list[str], key_to_label: dict[str, str]) -> tuple[list[Path], list[int]]:
    """Image paths and class indices (into `classnames`) of the training CSV's rows."""
    index = {name: i for i, name in enumerate(classnames)}
    with open(train_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [Path(r["image"]) for r in rows], [index[key_to_label[r["key"]]] for r in rows]


def run_supervised(cfg: DemoConfig, paths: list[Path], labels: list[int], classnames: list[str], steps: int,
                   out: Path) -> tuple[Callable[[Sequence[Path]], torch.Tensor], dict]:
    """Same image tower + a linear head, cross-entropy on the same images and augmentation; paths -> logits."""
    reference = create_model(cfg.model, seed=cfg.seed)
    visual, embed_dim = reference.visual, reference.config.embed_dim
    transform = TrainTransform(reference.image_size, scale=(AUG_SCALE_MIN, 1.0), color_jitter=AUG_COLOR_JITTER)
    loader = DataLoader(_AugmentedImages(paths, labels, transform), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=cfg.workers > 0)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as log:
        def on_step(step: int, loss: float, lr: float) -> None:
            log.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr}) + "\n")

        classifier = train_supervised(visual, embed_dim, loader, len(classnames), steps=steps, lr=cfg.lr,
                                      warmup_steps=min(cfg.warmup, steps // 4), batch_size=cfg.batch_size,
                                      precision=cfg.precision, seed=cfg.seed, on_step=on_step)
    seconds = time.perf_counter() - start
    preprocess = EvalTransform(reference.image_size)

    @torch.inference_mode()
    def predict(image_paths: Sequence[Path]) -> torch.Tensor:
        pixels, _ = decode_all(image_paths, preprocess)
        return torch.cat([classifier(pixels[i : i + 512]).float() for i in range(0, len(pixels), 512)])

    return predict, {"seconds": seconds, "steps": steps, "metrics": str(out / "metrics.jsonl")}
