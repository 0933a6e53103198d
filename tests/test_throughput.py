"""The training-speed report: FLOPs of a real step, the matmul rate it is compared with, and their share."""
from __future__ import annotations

import math

import pytest
import torch

import clipforge
from clipforge.distributed import DistInfo
from clipforge.loss import ContrastiveLoss
from clipforge.train import throughput
from clipforge.train.step import TrainStep
from clipforge.train.trainer import train
from test_train import config


def _step_and_forward(batch: int) -> tuple[float, float]:
    model = clipforge.create_model("cpu-vit-tiny-32", seed=0).train()
    pixels = torch.rand(batch, 3, model.image_size, model.image_size)
    tokens = torch.zeros(batch, model.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:9], tokens[:, 9] = 49406, 320, 49407  # 10 real tokens, then padding
    with throughput.counting_flops() as forward, torch.no_grad():
        model.encode_image(pixels), model.encode_text(tokens)
    step = TrainStep(model, ContrastiveLoss(), "fp32", 1, 0.0, DistInfo())
    with throughput.counting_flops() as counted:
        step(pixels, tokens)
    return counted(), forward()


def test_a_step_counts_forward_and_backward_and_scales_with_the_batch():
    eight, forward = _step_and_forward(8)
    sixteen, _ = _step_and_forward(16)
    assert sixteen == pytest.approx(2 * eight, rel=0.02)  # per-sample work; the B x B logits are a sliver
    # Backward costs about twice the forward (no gradient for the input pixels or token ids).
    assert 2.5 * forward < eight <= 3.05 * forward


def test_counting_off_intercepts_nothing():
    with throughput.counting_flops(False) as counted:
        torch.ones(4, 4) @ torch.ones(4, 4)
    assert counted() is None


def test_the_trainer_reports_its_first_steps_flops(tmp_path):
    from synthetic import make_caption_set

    make_caption_set(tmp_path / "data", per_concept=2, seed=0)
    summary = train(config(tmp_path / "data", tmp_path / "run", steps=2))
    one_batch = _step_and_forward(16)[0]  # the trainer's batch size, captions of a similar length
    assert summary["step_gflop"] is not None and 0.3 * one_batch < summary["step_gflop"] < 1.5 * one_batch


def test_the_share_is_achieved_over_the_best_matmul_rate(monkeypatch):
    monkeypatch.setattr(throughput, "best_matmul_gflops", lambda precision: 400.0)
    report = throughput.run_utilisation(20.0, steps=100, seconds=10.0, precision="bf16")
    assert report == {"precision": "bf16", "gflop_per_step": 20.0, "achieved_gflops": 200.0,
                      "best_matmul_gflops": 400.0, "share": 0.5}


def test_the_best_matmul_rate_is_a_measured_positive_rate():
    throughput.best_matmul_gflops.cache_clear()
    rate = throughput.best_matmul_gflops("fp32", repeats=1)
    assert math.isfinite(rate) and rate > 1.0
