"""Effective robustness (Taori et al. 2020, as the CLIP paper uses it): fit a line to baseline models'
(in-distribution, shifted) accuracies after a logit transform; a model's effective robustness is its shifted
accuracy minus the line's prediction at its in-distribution accuracy. Retained-accuracy ratios cannot
separate "more robust" from "less accurate": a weaker model of the same family keeps a larger share."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clipforge.errors import EvaluationError

# Accuracies of exactly 0 or 1 have infinite logits; they are clipped this far from the edges.
EDGE = 1e-4


def logit(p: float) -> float:
    """log(p / (1 - p)), with p clipped into [EDGE, 1 - EDGE]."""
    p = min(max(p, EDGE), 1 - EDGE)
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    """The inverse of `logit`."""
    return 1 / (1 + math.exp(-x))


@dataclass
class Trend:
    """logit(shifted) = slope * logit(in-distribution) + intercept, fitted to baseline models."""

    slope: float
    intercept: float
    points: list[tuple[float, float]]

    def predict(self, id_acc: float) -> float:
        """Shifted accuracy the baselines' trend expects at this in-distribution accuracy."""
        return sigmoid(self.slope * logit(id_acc) + self.intercept)

    def effective_robustness(self, id_acc: float, shifted_acc: float) -> float:
        """Shifted accuracy above (> 0) or below the trend at the same in-distribution accuracy."""
        return shifted_acc - self.predict(id_acc)


def fit_trend(points: Sequence[tuple[float, float]]) -> Trend:
    """Least-squares line through the baselines' (in-distribution, shifted) accuracies in logit space."""
    if len(points) < 2 or len({round(logit(x), 9) for x, _ in points}) < 2:
        raise EvaluationError("a trend needs at least two baselines of different in-distribution accuracy, "
                              f"got {points}")
    x = np.array([logit(a) for a, _ in points])
    y = np.array([logit(b) for _, b in points])
    slope, intercept = np.polyfit(x, y, 1)
    return Trend(float(slope), float(intercept), [(float(a), float(b)) for a, b in points])
