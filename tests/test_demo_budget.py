"""The demo's step budget: fixed per precision class, so a seed, --minutes and the precision repeat a run."""
from __future__ import annotations

import pytest

from clipforge.demo.config import DemoConfig
from clipforge.demo.run import OVERHEAD_SECONDS, SECONDS_PER_STEP, budget


def test_a_precision_that_runs_faster_trains_clip_longer_in_the_same_minutes():
    fp32, bf16 = budget(DemoConfig(precision="fp32")), budget(DemoConfig(precision="bf16"))
    assert SECONDS_PER_STEP["bf16"]["clip"] < SECONDS_PER_STEP["fp32"]["clip"] and bf16["clip"] > fp32["clip"]
    training = DemoConfig().minutes * 60 - OVERHEAD_SECONDS
    for precision, steps in (("fp32", fp32), ("bf16", bf16)):  # both spend the same training seconds
        spent = sum(steps[run] * SECONDS_PER_STEP[precision][run] for run in steps)
        assert abs(spent - training) < 1.0, precision
    assert budget(DemoConfig(precision="bf16")) == bf16  # no timing at run time: the same steps every time


def test_explicit_steps_win_and_minutes_scale_the_rest():
    steps = budget(DemoConfig(precision="bf16", clip_steps=123))
    assert steps["clip"] == 123
    longer = budget(DemoConfig(precision="bf16", minutes=30))
    assert longer["lit"] > 3 * steps["lit"] and longer["supervised"] > 3 * steps["supervised"]


def test_the_budget_needs_a_resolved_precision():
    with pytest.raises(ValueError, match="resolved precision"):
        budget(DemoConfig(precision="auto"))
