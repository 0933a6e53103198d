"""Effective robustness: the logit-space trend through baseline models, checked against a hand computation."""
from __future__ import annotations

import math

import pytest

from clipforge.evaluate.trend import fit_trend, logit, sigmoid


def test_trend_and_effective_robustness_by_hand():
    # Baselines on the line logit(shifted) = 0.5 * logit(id) - 1: id logits 0, 1, 2 -> shifted logits -1, -0.5, 0.
    points = [(sigmoid(0.0), sigmoid(-1.0)), (sigmoid(1.0), sigmoid(-0.5)), (sigmoid(2.0), sigmoid(0.0))]
    trend = fit_trend(points)
    assert trend.slope == pytest.approx(0.5) and trend.intercept == pytest.approx(-1.0)
    # A model at id = sigmoid(1) = 0.7311 with 0.5 shifted: the trend expects sigmoid(-0.5) = 0.3775.
    assert trend.predict(sigmoid(1.0)) == pytest.approx(1 / (1 + math.exp(0.5)))
    assert trend.effective_robustness(sigmoid(1.0), 0.5) == pytest.approx(0.5 - 0.37754066879814546)
    # Least squares, not interpolation: a noisy fourth point moves the line.
    noisy = fit_trend(points + [(sigmoid(1.0), sigmoid(0.5))])
    assert noisy.intercept == pytest.approx(-1.0 + 0.25) and noisy.slope == pytest.approx(0.5)


def test_edges_and_degenerate_families():
    assert logit(0.0) == pytest.approx(-logit(1.0)) and math.isfinite(logit(0.0))
    with pytest.raises(ValueError, match="two baselines"):
        fit_trend([(0.5, 0.2)])
    with pytest.raises(ValueError, match="different in-distribution"):
        fit_trend([(0.5, 0.2), (0.5, 0.3)])
