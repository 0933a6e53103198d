"""Training CoCa: the contrastive plus the captioning loss, exact under accumulation, and a run killed with -9
resumes to the same losses as an uninterrupted one."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.distributed import DistInfo
from clipforge.loss import ContrastiveLoss
from clipforge.train import checkpoints
from clipforge.train.config import TrainConfig
from clipforge.train.step import CaptionStep
from clipforge.train.trainer import train
from conftest import random_tokens
from synthetic import make_caption_set


def test_caption_step_is_the_weighted_sum_and_exact_under_accumulation():
    base = clipforge.create_model("cpu-coca-tiny-32", seed=0).double()
    pixels = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    tokens = random_tokens(16, 32, [4 + i % 12 for i in range(16)])
    grads, values = [], []
    for accum in (1, 4):
        model = copy.deepcopy(base)
        step = CaptionStep(model, ContrastiveLoss(), "fp32", accum, 0.0, DistInfo(), contrastive_weight=0.5,
                           caption_weight=2.0)
        values.append(step(pixels, tokens))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # the step's losses are taken in fp32 (as TrainStep's): the value agrees to fp32 rounding, the gradients exactly
    assert (grads[0] - grads[1]).abs().max() < 1e-12 and abs(values[0] - values[1]) < 1e-5
    with torch.no_grad():  # the value is 0.5 x contrastive + 2 x the mean token cross-entropy (padding ignored)
        image, text = base.encode_image(pixels, normalize=True), base.encode_text(tokens, normalize=True)
        contrastive = ContrastiveLoss()(image, text, base.logit_scale.exp(), None)
        caption = F.cross_entropy(base.caption_logits(pixels, tokens).transpose(1, 2), tokens[:, 1:], ignore_index=0)
    assert abs(values[0] - float(0.5 * contrastive + 2.0 * caption)) < 1e-5


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.integration
def test_a_coca_run_killed_with_sigkill_resumes_to_the_uninterrupted_losses(tmp_path):
    make_caption_set(tmp_path, per_concept=1, seed=0)
    base = dict(model="cpu-coca-tiny-32", train_data=str(tmp_path / "train.csv"), batch_size=8, workers=0,
                warmup=2, lr=1e-3, seed=0, steps=12, caption_loss_weight=1.5)
    train(TrainConfig(**base, output_dir=str(tmp_path / "straight")))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clipforge.cli.main", "train", "--model", "cpu-coca-tiny-32", "--train-data",
           base["train_data"], "--batch-size", "8", "--workers", "0", "--warmup", "2", "--lr", "1e-3", "--steps", "12",
           "--caption-loss-weight", "1.5", "--save-every", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: on 2 busy cores the first checkpoints took over 2 minutes
    while time.time() < deadline and proc.poll() is None and len(checkpoints.list_checkpoints(out)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = int(checkpoints.resolve_resume(out, "latest").name.split("-")[1])
    assert resumed_from < 12, "the run finished before the kill: nothing was resumed"
    train(TrainConfig(**base, output_dir=str(out), resume="latest"))
    straight, killed = _losses(tmp_path / "straight"), _losses(out)
    assert sorted(killed) == list(range(1, 13))
    for step in range(resumed_from + 1, 13):
        assert abs(straight[step] - killed[step]) <= 1e-6, step
    model, _ = clipforge.load(checkpoints.resolve_resume(out, "latest"))
    assert model.text_decoder is not None and model.generate(torch.randn(1, 3, 32, 32), max_length=5).shape[0] == 1


def test_a_coca_run_trains_in_bf16_with_fp32_masters(tmp_path):
    make_caption_set(tmp_path, per_concept=1, seed=0)
    summary = train(TrainConfig(model="cpu-coca-tiny-32", train_data=str(tmp_path / "train.csv"), batch_size=8,
                                workers=0, warmup=1, lr=1e-3, seed=0, steps=3, precision="bf16",
                                output_dir=str(tmp_path / "run")))
    losses = _losses(tmp_path / "run")
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    model, _ = clipforge.load(summary["checkpoint"])
    assert model.text_decoder.text_projection.dtype == torch.float32  # checkpoints keep the fp32 masters


def test_decoder_only_training_leaves_the_clip_bit_identical(tmp_path):
    make_caption_set(tmp_path, per_concept=1, seed=0)
    start = clipforge.create_model("cpu-coca-tiny-32", seed=0)
    clipforge.save_pretrained(start, tmp_path / "start")
    base = dict(train_data=str(tmp_path / "train.csv"), batch_size=8, workers=0, warmup=1, lr=1e-3, seed=0, steps=3)
    for accum in (1, 2):
        summary = train(TrainConfig(model=str(tmp_path / "start"), decoder_only=True, accum_steps=accum,
                                    output_dir=str(tmp_path / f"run{accum}"), **base))
        trained, _ = clipforge.load(summary["checkpoint"])
        before, after = start.state_dict(), trained.state_dict()
        for name, value in after.items():
            same = torch.equal(value, before[name])
            assert same != name.startswith("text_decoder."), name  # the decoder moved, nothing else did
    with pytest.raises(Exception, match="captioning decoder"):
        train(TrainConfig(model="cpu-vit-tiny-32", decoder_only=True, output_dir=str(tmp_path / "no"), **base))
