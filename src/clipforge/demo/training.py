"""The demo's three training runs: CLIP from scratch, LiT (locked pretrained MiniLM) and a supervised baseline."""
from __future__ import annotations

import copy
import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from clipforge.checkpoint.io import get_tokenizer, load
from clipforge.data.decoded import DecodedImages, build_decoded_cache, stored_size_for, tensor_transform_like
from clipforge.data.labelled import decode_all
from clipforge.data.transforms import TrainTransform
from clipforge.demo.config import DemoConfig
from clipforge.demo.data import ICON_STYLE
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
    step_gflop: float | None  # GFLOP of one training step (its first, on a real batch)


def train_config(cfg: DemoConfig, train_csv: Path, out: Path, steps: int, text_tower: str = "clip") -> TrainConfig:
    """The TrainConfig of the CLIP (text_tower "clip") or LiT (text_tower "minilm", locked) run."""
    return TrainConfig(
        model=cfg.model, text_tower=text_tower, lock_text=text_tower == "minilm", train_data=str(train_csv),
        key_column="key", caption_separator="|", aug_scale_min=AUG_SCALE_MIN, aug_color_jitter=AUG_COLOR_JITTER,
        workers=0 if cfg.data_path == "decoded" else cfg.workers, decoded_cache=cfg.data_path == "decoded",
        decoded_cache_dir=str(cfg.data_dir() / ".decoded"), batch_size=cfg.batch_size, steps=steps, lr=cfg.lr,
        warmup=min(cfg.warmup, steps // 4), weight_decay=0.1, precision=cfg.precision, seed=cfg.seed,
        output_dir=str(out), log_every=1, keep_last=1,
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
                        seconds, summary["steps"], summary["step_gflop"])


class _AugmentedImages(Dataset):
    """(pixels, label) with the training augmentation, re-drawn every time an item is read.

    With the decoded cache, items are (index, augmentation draw, label) and `collate` makes whole batches.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: TrainTransform,
                 decoded: DecodedImages | None = None) -> None:
        self.paths, self.labels, self.transform, self.decoded = list(paths), list(labels), transform, decoded
        self.tensor_transform = tensor_transform_like(transform) if decoded is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if self.decoded is not None:  # the random module: seeded by run_supervised
            return index, self.tensor_transform.draw(random, self.decoded.stored_size), self.labels[index]
        return self.transform(self.paths[index]), self.labels[index]

    def collate(self, items: Sequence[tuple[Any, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, labels) of a batch."""
        if self.decoded is None:
            return default_collate(items)
        indices, draws, labels = zip(*items)
        return self.tensor_transform.apply(self.decoded.pixels[list(indices)], draws), torch.tensor(labels)


class EvalPixels:
    """Eval-transform pixels of a list of paths, decoded once and shared by every supervised predictor."""

    def __init__(self, preprocess: Callable) -> None:
        self.preprocess, self.key, self.pixels = preprocess, None, None

    def __call__(self, paths: Sequence[Path]) -> torch.Tensor:
        """[N, 3, S, S] pixels; the same list again is not decoded again."""
        key = tuple(str(p) for p in paths)
        if key != self.key:
            self.pixels, _ = decode_all(paths, self.preprocess)
            self.key = key
        return self.pixels


def predictor(classifier: torch.nn.Module, pixels: EvalPixels) -> Callable[[Sequence[Path]], torch.Tensor]:
    """paths -> logits of a trained classifier."""
    @torch.inference_mode()
    def predict(image_paths: Sequence[Path]) -> torch.Tensor:
        batch = pixels(image_paths)
        return torch.cat([classifier(batch[i : i + 512]).float() for i in range(0, len(batch), 512)])

    return predict


def read_training_rows(
    train_csv: Path, classnames: list[str], key_to_label: dict[str, str]
) -> tuple[list[Path], list[int]]:
    """Image paths and class indices (into `classnames`) of the training CSV's rows."""
    index = {name: i for i, name in enumerate(classnames)}
    with open(train_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Emoji rows only: the supervised baseline learns from labels, and icons have none (an icon named like a
    # concept carries the concept's key for batching, not a label).
    rows = [r for r in rows if r["key"] in key_to_label and r["style"] != ICON_STYLE]
    return [Path(r["image"]) for r in rows], [index[key_to_label[r["key"]]] for r in rows]


def run_supervised(cfg: DemoConfig, paths: list[Path], labels: list[int], classnames: list[str], steps: int,
                   out: Path, pixels: EvalPixels, width: int | None = None,
                   snapshots: Sequence[float] = ()) -> tuple[Callable[[Sequence[Path]], torch.Tensor], dict]:
    """Same image tower (at `width`, default the model's) + a linear head, cross-entropy on the same images and
    augmentation; returns paths -> logits and info, with predictors of the checkpoints at `snapshots` (fractions
    of the steps) under info["snapshots"]."""
    reference = create_model(cfg.model, seed=cfg.seed, **({"vision.width": width} if width else {}))
    visual, embed_dim = reference.visual, reference.config.embed_dim
    transform = TrainTransform(reference.image_size, scale=(AUG_SCALE_MIN, 1.0), color_jitter=AUG_COLOR_JITTER)
    decoded = None
    if cfg.data_path == "decoded":
        decoded = build_decoded_cache([str(p) for p in paths], stored_size_for(reference.image_size, AUG_SCALE_MIN),
                                      cache_dir=cfg.data_dir() / ".decoded", progress=False)
    workers = 0 if decoded is not None else cfg.workers
    images = _AugmentedImages(paths, labels, transform, decoded)
    loader = DataLoader(images, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=workers > 0,
                        collate_fn=images.collate)
    out.mkdir(parents=True, exist_ok=True)
    kept: dict[float, Callable] = {}
    at = {max(1, round(f * steps)): f for f in snapshots}
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as log:
        def on_step(step: int, loss: float, lr: float) -> None:
            log.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr}) + "\n")

        def on_snapshot(step: int, model: torch.nn.Module) -> None:
            kept[at[step]] = predictor(copy.deepcopy(model).eval(), pixels)

        random.seed(cfg.seed)  # the tensor augmentation draws from the random module
        classifier = train_supervised(visual, embed_dim, loader, len(classnames), steps=steps, lr=cfg.lr,
                                      warmup_steps=min(cfg.warmup, steps // 4), batch_size=cfg.batch_size,
                                      precision=cfg.precision, seed=cfg.seed, on_step=on_step,
                                      snapshot_steps=sorted(at), on_snapshot=on_snapshot)
    seconds = time.perf_counter() - start
    return predictor(classifier, pixels), {"seconds": seconds, "steps": steps, "metrics": str(out / "metrics.jsonl"),
                                           "snapshots": kept}
