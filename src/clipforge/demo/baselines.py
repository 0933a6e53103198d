"""The demo's supervised "ImageNet" baselines and the effective-robustness trend fitted through them.

One supervised run gives checkpoints along training; two narrower towers (half the steps each) give
models of other capacity. Their (in-distribution, held-out style) accuracies define the trend that
zero-shot CLIP is compared with, as in the CLIP paper's Figure 13 (Taori et al. 2020's protocol).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.data.transforms import EvalTransform
from clipforge.demo.config import DemoConfig
from clipforge.demo.training import EvalPixels, run_supervised
from clipforge.evaluate.report import Section, plot_trend
from clipforge.evaluate.trend import fit_trend

SNAPSHOTS = (0.25, 0.5, 0.75)  # checkpoints of the main supervised run that join the family
NARROW_WIDTHS = (16, 24)  # the image tower's width in the two extra supervised runs (the demo's is 32)
COMPARED = ("CLIP zero-shot", "LiT zero-shot", "CLIP linear probe")

Predictor = Callable[[Sequence[Path]], torch.Tensor]


def supervised_family(cfg: DemoConfig, paths: list[Path], labels: list[int], classnames: list[str], steps: int,
                      out: Path, image_size: int) -> tuple[Predictor, dict[str, Predictor], dict[str, Any]]:
    """(the main supervised model, every baseline by name including it, timing info)."""
    pixels = EvalPixels(EvalTransform(image_size))
    main, info = run_supervised(cfg, paths, labels, classnames, steps, out / "supervised", pixels,
                                snapshots=SNAPSHOTS)
    family = {f"supervised @{round(f * 100)}%": p for f, p in sorted(info["snapshots"].items())}
    family["supervised"] = main
    seconds = info["seconds"]
    for width in NARROW_WIDTHS:
        narrow, extra = run_supervised(cfg, paths, labels, classnames, max(10, steps // 2), out / f"supervised-w{width}",
                                       pixels, width=width, snapshots=(0.5,))
        family[f"supervised w{width} @50%"] = extra["snapshots"][0.5]
        family[f"supervised w{width}"] = narrow
        seconds += extra["seconds"]
    return main, family, {**info, "family_seconds": seconds}


def effective_robustness(domains: dict[str, Any], baselines: Sequence[str], held_out: Sequence[str], out: Path,
                         sections: list[Section], extra: Sequence[str] = ()) -> dict[str, Any]:
    """Per held-out style: the baselines' logit trend, and each compared model's distance above or below it."""
    held_out = [s for s in held_out if s in domains[baselines[0]]["per_domain"]]
    trends, unfit = {}, {}
    for style in held_out:
        try:
            trends[style] = fit_trend([(domains[m]["in_distribution"], domains[m]["per_domain"][style]) for m in baselines])
        except ValueError as error:  # e.g. a smoke run whose baselines are all at 0: say so, do not fail the run
            unfit[style] = str(error)
    if not trends:
        sections.append(Section("Effective robustness over the supervised trend", f"no trend could be fitted: {unfit}"))
        return {"baselines": list(baselines), "trends": {}, "models": {}, "unfit": unfit}
    held_out = list(trends)
    models = {m: {s: (domains[m]["in_distribution"], domains[m]["per_domain"][s]) for s in held_out}
              for m in (*COMPARED, *extra) if m in domains}
    results: dict[str, Any] = {"baselines": list(baselines), "trends": {}, "models": {}, "unfit": unfit}
    rows = []
    for style, trend in trends.items():
        results["trends"][style] = {"slope": trend.slope, "intercept": trend.intercept, "points": trend.points}
    for name, points in models.items():
        per_style = {s: trends[s].effective_robustness(*points[s]) for s in held_out}
        mean = sum(per_style.values()) / len(per_style)
        results["models"][name] = {"per_style": per_style, "mean": mean}
        rows.append({"model": name, "in-dist": points[held_out[0]][0], **per_style, "mean": mean})
    plot = plot_trend(trends, models, out / "effective-robustness.png", "supervised trend")
    sections.append(Section(
        "Effective robustness over the supervised trend",
        f"{len(baselines)} supervised baselines (checkpoints along training and narrower towers) define, per held-out "
        "style, a line through logit(in-distribution top-1) vs logit(held-out top-1). Effective robustness = a "
        "model's held-out top-1 minus the line's prediction at its in-distribution top-1 (> 0: more robust than a "
        "supervised model of the same in-distribution accuracy).", rows, None, [plot]))
    return results
