"""The demo's supervised "ImageNet" baselines and the effective-robustness trend fitted through them.

One supervised run gives checkpoints along training; two narrower towers (half the steps each) give
models of other capacity. Their (in-distribution, held-out style) accuracies define the trend that
zero-shot CLIP is compared with, as in the CLIP paper's Figure 13 (Taori et al. 2020's protocol).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.data.transforms import EvalTransform
from clipforge.demo.config import DemoConfig
from clipforge.demo.robustness import zero_shot_method
from clipforge.demo.training import EvalPixels, run_supervised
from clipforge.evaluate.report import Section, plot_trend
from clipforge.evaluate.tasks import CLIP_LINEAR_PROBE, SUPERVISED
from clipforge.evaluate.trend import fit_trend

SNAPSHOTS = (0.25, 0.5, 0.75)  # checkpoints of the main supervised run that join the family
NARROW_WIDTHS = (16, 24)  # the image tower's width in the two extra supervised runs (the demo's is 32)
COMPARED = (zero_shot_method("CLIP"), zero_shot_method("LiT"), CLIP_LINEAR_PROBE)  # method ids

Predictor = Callable[[Sequence[Path]], torch.Tensor]


@dataclass
class SupervisedFamily:
    """The supervised baselines: the main run, every member by method id (the main run included), their labels."""

    main: Predictor
    members: dict[str, Predictor]
    labels: dict[str, str]
    info: dict[str, Any]  # the main run's info, with "family_seconds" for all of them


def member(width: int | None = None, fraction: float | None = None) -> tuple[str, str]:
    """(method id, report label) of a baseline: the main run or a narrower one (`width`), or a snapshot of one."""
    method, label = SUPERVISED, "supervised"
    if width:
        method, label = f"{method}-w{width}", f"{label} w{width}"
    if fraction is not None:
        method, label = f"{method}-at-{round(fraction * 100)}", f"{label} @{round(fraction * 100)}%"
    return method, label


def supervised_family(cfg: DemoConfig, paths: list[Path], labels: list[int], classnames: list[str], steps: int,
                      out: Path, image_size: int) -> SupervisedFamily:
    """Train the main supervised run (with snapshots) and the narrower ones; every member keyed by method id."""
    pixels = EvalPixels(EvalTransform(image_size))
    main, info = run_supervised(cfg, paths, labels, classnames, steps, out / "supervised", pixels,
                                snapshots=SNAPSHOTS)
    members = [(member(fraction=f), p) for f, p in sorted(info["snapshots"].items())] + [(member(), main)]
    seconds = info["seconds"]
    for width in NARROW_WIDTHS:
        narrow, extra = run_supervised(cfg, paths, labels, classnames, max(10, steps // 2),
                                       out / f"supervised-w{width}", pixels, width=width, snapshots=(0.5,))
        members += [(member(width, 0.5), extra["snapshots"][0.5]), (member(width), narrow)]
        seconds += extra["seconds"]
    return SupervisedFamily(main, {m: p for (m, _), p in members}, {m: label for (m, label), _ in members},
                            {**info, "family_seconds": seconds})


def effective_robustness(domains: dict[str, Any], baselines: Sequence[str], held_out: Sequence[str], out: Path,
                         sections: list[Section], extra: Sequence[str] = (),
                         labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Per held-out style: the baselines' logit trend, and each compared method's distance above or below it.

    `domains` and the results are keyed by method id; `labels` names the methods in the table and the plot.
    """
    labels = labels or {}
    held_out = [s for s in held_out if s in domains[baselines[0]]["per_domain"]]
    trends, unfit = {}, {}
    for style in held_out:
        try:
            trends[style] = fit_trend([(domains[m]["in_distribution"], domains[m]["per_domain"][style])
                                       for m in baselines])
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
        rows.append({"model": labels.get(name, name), "in-dist": points[held_out[0]][0], **per_style, "mean": mean})
    plot = plot_trend(trends, {labels.get(m, m): p for m, p in models.items()}, out / "effective-robustness.png",
                      "supervised trend")
    sections.append(Section(
        "Effective robustness over the supervised trend",
        f"{len(baselines)} supervised baselines (checkpoints along training and narrower towers) define, per held-out "
        "style, a line through logit(in-distribution top-1) vs logit(held-out top-1). Effective robustness = a "
        "model's held-out top-1 minus the line's prediction at its in-distribution top-1 (> 0: more robust than a "
        "supervised model of the same in-distribution accuracy).", rows, None, [plot]))
    return results
