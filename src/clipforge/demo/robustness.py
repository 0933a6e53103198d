"""The demo's robustness measurement: the library's robustness steps on features computed once, with the
demo's own held-out images, trained predictors and C sweep. Methods are keyed by id; labels are for the report."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.data.labelled import LabelledImages
from clipforge.errors import EvaluationError
from clipforge.evaluate.tasks import (
    EvalContext,
    RobustnessSettings,
    RobustnessSplit,
    clip_predictions,
    in_distribution_rows,
    robustness_results,
)

Predictor = Callable[[Sequence[Path]], torch.Tensor]

# The paper's C sweep is 1e-3..1e3; at 1,282 classes the weakly regularised end needs hundreds of
# L-BFGS iterations and never wins on these features, so the demo sweeps 0.1..100.
PROBE_CS = (0.1, 1.0, 10.0, 100.0)


def zero_shot_method(model: str) -> str:
    """The method id of a demo model's zero-shot classifier: "CLIP" -> "clip-zero-shot"."""
    return "-".join("".join(c if c.isalnum() else " " for c in model.lower()).split()) + "-zero-shot"


def held_out_split(seen: LabelledImages, train_styles: Sequence[str], id_test: set[tuple[str, str]]) -> RobustnessSplit:
    """The training styles' rows, and among them the images no model trained on ((concept key, style) pairs)."""
    in_id = in_distribution_rows(seen, train_styles)
    held_out = torch.tensor([(Path(p).stem, d) in id_test for p, d in zip(seen.paths, seen.domains)]) & in_id
    if not held_out.any():
        raise EvaluationError("the held-out in-distribution images are none of the evaluated ones")
    return RobustnessSplit(in_id, held_out)


def demo_robustness(ctx: EvalContext, seen: LabelledImages, features: torch.Tensor, split: RobustnessSplit,
                    predictors: dict[str, Predictor], labels: dict[str, str],
                    settings: RobustnessSettings) -> dict[str, Any]:
    """Accuracy per style of CLIP zero-shot, its linear probe and every predictor (method id -> paths -> logits)."""
    if len(features) != len(seen.paths):
        raise EvaluationError(f"{len(features)} feature rows for {len(seen.paths)} images")
    predictions = clip_predictions(ctx, seen, features, split, PROBE_CS)
    predictions.update({method: predict(seen.paths).argmax(-1) for method, predict in predictors.items()})
    return robustness_results(ctx, seen, split, predictions, settings, labels)


def robustness_point(results: dict[str, Any], method: str, held_out: Sequence[str]) -> dict[str, Any] | None:
    """A method's in-distribution top-1, mean held-out top-1 and effective robustness from the demo's results."""
    domain = results["robustness"]["domains"].get(method)
    if domain is None:
        return None
    accuracies = [domain["per_domain"][s] for s in held_out if s in domain["per_domain"]]
    er = results.get("effective_robustness", {}).get("models", {}).get(method, {}).get("mean")
    return {"in_distribution": domain["in_distribution"], "held_out_mean": sum(accuracies) / len(accuracies),
            "effective_robustness": er}
