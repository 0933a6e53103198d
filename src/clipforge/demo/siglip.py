"""The demo's CLIP-vs-SigLIP row (--siglip 1): the same towers, data, batch, steps and seed, trained with SigLIP's
pairwise sigmoid loss (learned temperature from 10 and bias from -10) and SigLIP's text-tower options
(bidirectional attention, pooled at the last position, a biased projection). The image tower stays the demo's:
its ResNet already ends in an attention pool. Outside the 10-minute budget: one more run of CLIP's length."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from clipforge.data.labelled import LabelledImages
from clipforge.demo.config import DemoConfig
from clipforge.demo.evaluation import Evaluated, embed_all
from clipforge.demo.robustness import robustness_point, zero_shot_method
from clipforge.demo.training import run_contrastive, train_config
from clipforge.evaluate.report import Section
from clipforge.evaluate.tasks import CLIP_ZERO_SHOT

NAME = "SigLIP"
SIGLIP_TEXT_TOWER = {"text.causal": False, "text.pool": "last", "text.projection_bias": True}


def siglip_model(cfg: DemoConfig, train_csv: Path, everything: LabelledImages, out: Path,
                 steps: int) -> tuple[Evaluated, dict[str, Any]]:
    """Train the SigLIP row on CLIP's table at CLIP's step count; its features for every table, and run info."""
    config = dataclasses.replace(train_config(cfg, train_csv, out / "siglip", steps), loss="siglip",
                                 model_overrides=dict(SIGLIP_TEXT_TOWER))
    model = run_contrastive(NAME, config)
    info = {"steps": model.steps, "seconds": model.seconds, "checkpoint": str(model.checkpoint),
            "logit_scale": model.model.logit_scale.detach().exp().item(),
            "logit_bias": model.model.logit_bias.detach().item()}
    return embed_all(NAME, model.model, model.tokenizer, model.preprocess, everything), info


def _unseen_mean(results: dict[str, Any], name: str, held_out: Sequence[str]) -> float | None:
    by_style = results.get("zero_shot", {}).get(name, {}).get("unseen", {})
    values = [by_style[s]["top1"] for s in held_out if s in by_style]
    return sum(values) / len(values) if values else None


def siglip_findings(results: dict[str, Any], info: dict[str, Any], clip_seconds: float, held_out: Sequence[str],
                    sections: list[Section]) -> dict[str, Any]:
    """CLIP and SigLIP side by side (zero-shot, held-out styles, unseen concepts, effective robustness)."""
    rows, points = [], {}
    for name, method, seconds in (("CLIP", CLIP_ZERO_SHOT, clip_seconds),
                                  (NAME, zero_shot_method(NAME), info["seconds"])):
        point = robustness_point(results, method, held_out) or {}
        points[name] = {**point, "unseen_held_out_mean": _unseen_mean(results, name, held_out),
                        "train_seconds": seconds}
        rows.append({"model": name, **points[name]})
    gap = {k: points[NAME][k] - points["CLIP"][k] for k in ("held_out_mean", "effective_robustness")
           if points[NAME].get(k) is not None and points["CLIP"].get(k) is not None}
    sections.append(Section(
        "CLIP vs SigLIP at equal compute",
        f"Same image tower, data, batch, seed and {info['steps']} steps; SigLIP: sigmoid loss over every image-text "
        f"pair of the batch with a learned bias (ended at temperature {info['logit_scale']:.1f}, bias "
        f"{info['logit_bias']:.2f}), bidirectional text tower pooled at the last position. Zero-shot with the same "
        "prompt ensemble (a sigmoid is monotonic: top-1 is the argmax of the cosine either way). The SigLIP paper "
        "finds the sigmoid loss ahead of the softmax loss at small batches and level from a few thousand up; this "
        "batch is small.", rows))
    return {"models": points, "siglip_minus_clip": gap}
