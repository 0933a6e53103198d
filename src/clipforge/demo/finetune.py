"""The demo's fine-tuning section (`--finetune 1`): the paper's "adapt to ImageNet" (its Figure 14) and WiSE-FT.

The demo's CLIP is fine-tuned on its training styles' seen-concept images (the in-distribution test images left
out) by cross-entropy with a head started as its zero-shot classifier, and by FLYP; WiSE-FT mixes the zero-shot
and cross-entropy models. Each joins the robustness measurement as a predictor, so its in-distribution top-1,
held-out styles and effective robustness come from the same images and trend as every other method.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.checkpoint.io import load
from clipforge.data.transforms import EvalTransform
from clipforge.demo.config import DemoConfig
from clipforge.demo.robustness import robustness_point
from clipforge.demo.training import AUG_COLOR_JITTER, AUG_SCALE_MIN, EvalPixels, TrainedModel, predictor
from clipforge.evaluate.report import Section
from clipforge.evaluate.tasks import CLIP_ZERO_SHOT
from clipforge.finetune.config import FinetuneConfig
from clipforge.finetune.run import finetune
from clipforge.finetune.wise import interpolate, zero_shot_end
from clipforge.model import CLIP

METHODS = {"ce": "fine-tuned (cross-entropy)", "flyp": "fine-tuned (FLYP)"}
WISE_ALPHAS = (0.25, 0.5, 0.75)  # the ends are the zero-shot CLIP (alpha 0) and the cross-entropy model (alpha 1)


def method_id(name: str) -> str:
    """The robustness method id of a fine-tuned model ("ce") or a WiSE-FT mixture ("wise-0.5")."""
    return f"finetune-{name}" if name in METHODS else name


@dataclass
class FinetunedPredictors:
    """Paths -> logits (over the seen classes) of every fine-tuned model and mixture, with their report labels."""

    predictors: dict[str, Callable[[Sequence[Path]], torch.Tensor]]
    labels: dict[str, str]
    info: dict[str, Any]


def finetune_table(emoji: Path, styles: Sequence[str], id_test: set[tuple[str, str]], path: Path) -> Path:
    """A labels CSV of the training styles' seen-concept images, the in-distribution test images left out."""
    with open(emoji / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["style"] in styles and r["split"] == "seen"
                and (Path(r["image"]).stem, r["style"]) not in id_test]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "style"])
        writer.writerows([str((emoji / r["image"]).resolve()), r["label"], r["style"]] for r in rows)
    return path


def finetune_config(cfg: DemoConfig, checkpoint: Path, table: Path, out: Path, method: str) -> FinetuneConfig:
    """The FinetuneConfig of one method: the demo's batch, precision, augmentation and data path."""
    steps = cfg.finetune_steps
    return FinetuneConfig(
        model=str(checkpoint), data=str(table), method=method, templates=cfg.templates, steps=steps,
        lr=cfg.finetune_lr, warmup=min(cfg.warmup, steps // 4), batch_size=cfg.batch_size, precision=cfg.precision,
        seed=cfg.seed, aug_scale_min=AUG_SCALE_MIN, aug_color_jitter=AUG_COLOR_JITTER,
        workers=0 if cfg.data_path == "decoded" else cfg.workers, decoded_cache=cfg.data_path == "decoded",
        decoded_cache_dir=str(cfg.data_dir() / ".decoded"), output_dir=str(out), log_every=1, keep_last=1)


class _SeenOrder(torch.nn.Module):
    """A fine-tuned model's head logits, columns in the order of the seen classes (a class it lacks: -inf)."""

    def __init__(self, model: CLIP, classnames: Sequence[str]) -> None:
        super().__init__()
        self.model = model.eval()
        known = {name: i for i, name in enumerate(model.classnames)}
        self.columns = torch.tensor([known.get(name, -1) for name in classnames])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.model.classify(pixels).float()
        padded = torch.cat([logits, torch.full((len(logits), 1), float("-inf"))], dim=1)
        return padded[:, self.columns]


def finetuned_predictors(cfg: DemoConfig, clip: TrainedModel, emoji: Path, id_test: set[tuple[str, str]],
                         classnames: Sequence[str], out: Path) -> FinetunedPredictors:
    """Fine-tune the demo's CLIP by each method, mix it with WiSE-FT, and return the predictors to measure."""
    table = finetune_table(emoji, cfg.styles("train"), id_test, out / "finetune" / "train-labels.csv")
    pixels = EvalPixels(EvalTransform(clip.model.image_size))
    predictors, labels, info = {}, {}, {"steps": cfg.finetune_steps, "lr": cfg.finetune_lr, "seconds": {}}
    models = {}
    for name, label in METHODS.items():
        tick = time.perf_counter()
        summary = finetune(finetune_config(cfg, clip.checkpoint, table, out / "finetune" / name, name))
        info["seconds"][name] = time.perf_counter() - tick
        models[name] = load(summary["checkpoint"])[0]
        predictors[method_id(name)], labels[method_id(name)] = predictor(_SeenOrder(models[name], classnames),
                                                                         pixels), label
    start = zero_shot_end(clip.model, models["ce"], clip.tokenizer)
    for alpha in WISE_ALPHAS:
        key = f"wise-{alpha:g}"
        predictors[key] = predictor(_SeenOrder(interpolate(start, models["ce"], alpha), classnames), pixels)
        labels[key] = f"WiSE-FT alpha {alpha:g}"
    return FinetunedPredictors(predictors, labels, info)


def finetune_findings(results: dict[str, Any], tuned: FinetunedPredictors, held_out: Sequence[str],
                      sections: list[Section]) -> dict[str, Any]:
    """The section's numbers (methods and the WiSE-FT curve, zero-shot at alpha 0), its table and its verdicts."""
    methods = {"zero-shot": CLIP_ZERO_SHOT, **{n: method_id(n) for n in METHODS}}
    points = {name: robustness_point(results, method, held_out) for name, method in methods.items()}
    points["linear probe"] = robustness_point(results, "clip-linear-probe", held_out)
    curve = [{"alpha": 0.0, **(points["zero-shot"] or {})}]
    curve += [{"alpha": a, **(robustness_point(results, f"wise-{a:g}", held_out) or {})} for a in WISE_ALPHAS]
    curve.append({"alpha": 1.0, **(points["ce"] or {})})
    best = max(curve, key=lambda p: p.get("held_out_mean", -1.0))
    ends = (curve[0].get("held_out_mean"), curve[-1].get("held_out_mean"))
    found = {"methods": points, "wise": curve, "best_alpha": best["alpha"],
             "wise_above_both_ends": None if None in ends else best["held_out_mean"] > max(ends), **tuned.info}
    rows = [{"model": name, **{k: v for k, v in (p or {}).items()}} for name, p in points.items()]
    rows += [{"model": f"WiSE-FT alpha {p['alpha']:g}", **{k: v for k, v in p.items() if k != "alpha"}}
             for p in curve]
    sections.append(Section(
        "Fine-tuning and WiSE-FT (the paper's \"adapt to ImageNet\")",
        f"The demo's CLIP fine-tuned on its training styles for {tuned.info['steps']} steps (lr "
        f"{tuned.info['lr']:g}): cross-entropy with a head started as its zero-shot classifier, and FLYP "
        "(contrastive on class prompts). The linear probe fits the training styles on frozen features. WiSE-FT "
        "mixes the zero-shot and cross-entropy weights (alpha 0 = zero-shot, 1 = fine-tuned). Held-out mean = "
        "mean top-1 over the held-out styles; effective robustness over the supervised trend as above.", rows))
    return found
