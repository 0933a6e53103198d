"""Fine-tuning (`clipforge finetune`: ce, flyp, lp-ft) and WiSE-FT (`clipforge wise`, `clipforge.wise`)."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.distributed import DistInfo
from clipforge.errors import CheckpointError, ConfigError, TrainingError
from clipforge.finetune.config import FinetuneConfig
from clipforge.finetune.run import FinetuneRun, finetune, write_training_table
from clipforge.finetune.wise import interpolate, zero_shot_end
from clipforge.inference.templates import get_templates
from clipforge.inference.zeroshot import build_classifier, zero_shot_predict
from clipforge.model.towers import tokenizer_for
from clipforge.train import checkpoints
from clipforge.train.step import ClassifierStep
from synthetic import make_labelled_set

CLI = [sys.executable, "-m", "clipforge.cli.main"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return make_labelled_set(tmp_path_factory.mktemp("labelled"), per_concept=2)


def _config(labelled: Path, out: Path, **changes) -> FinetuneConfig:
    values = dict(model="cpu-vit-tiny-32", random_weights=True, data=str(labelled), styles="filled", batch_size=8,
                  workers=0, steps=3, lr=1e-3, warmup=0, output_dir=str(out))
    return FinetuneConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def tuned(labelled, tmp_path_factory) -> tuple[clipforge.CLIP, clipforge.CLIP]:
    """(the random tiny CLIP the run starts from, its ce fine-tuned classifier)."""
    out = tmp_path_factory.mktemp("ce")
    summary = finetune(_config(labelled, out))
    return clipforge.create_model("cpu-vit-tiny-32", seed=0), clipforge.load(summary["checkpoint"])[0]


def test_head_starts_as_the_zero_shot_classifier(labelled, tmp_path):
    config = _config(labelled, tmp_path, val_data=str(labelled), val_styles="filled")
    derived, classnames = write_training_table(config)
    run = FinetuneRun(FinetuneConfig(**{**config.__dict__, **derived}), classnames)
    model, tokenizer = run.model.eval(), run.tokenizer
    classifier = build_classifier(model, tokenizer, classnames, get_templates("simple"), cache=False)
    pixels, images = run.validation.pixels, run.validation.images
    with torch.no_grad():
        expected = zero_shot_predict(model, model.encode_image(pixels), classifier)
        torch.testing.assert_close(model.classify(pixels), expected, rtol=1e-5, atol=1e-5)
    zero_shot_top1 = (expected.argmax(1) == images.labels).float().mean().item()
    assert run.validation(model, torch.device("cpu"))["top1_filled"] == pytest.approx(zero_shot_top1)


def test_wise_ends_are_their_inputs_bit_exactly_and_the_middle_is_linear(tuned):
    zero_shot, finetuned = tuned
    start = zero_shot_end(zero_shot, finetuned)
    ends = {0.0: start.state_dict(), 1.0: finetuned.state_dict()}
    for alpha, expected in ends.items():
        mixed = clipforge.wise(zero_shot, finetuned, alpha).state_dict()
        assert mixed.keys() == expected.keys()
        assert all(torch.equal(mixed[k], expected[k]) for k in expected)
    mixed = interpolate(start, finetuned, 0.3).state_dict()
    for key, value in finetuned.state_dict().items():
        assert torch.equal(mixed[key], 0.7 * ends[0.0][key] + 0.3 * value), key
    assert not torch.equal(ends[0.0]["head.weight"], ends[1.0]["head.weight"])  # training moved the head


def test_wise_zero_end_classifies_as_zero_shot(tuned, labelled):
    zero_shot, finetuned = tuned
    model = clipforge.wise(zero_shot, finetuned, 0.0)
    pixels = torch.randn(4, 3, 32, 32)
    classifier = build_classifier(zero_shot, tokenizer_for(zero_shot.config), finetuned.classnames,
                                  get_templates("simple"), cache=False)
    with torch.no_grad():
        expected = zero_shot_predict(zero_shot.eval(), zero_shot.encode_image(pixels), classifier)
        torch.testing.assert_close(model.classify(pixels), expected, rtol=1e-5, atol=1e-5)
    assert model.classnames == finetuned.classnames


def test_wise_refuses_mismatched_models(tuned):
    zero_shot, finetuned = tuned
    wider = clipforge.create_model("cpu-vit-tiny-32", embed_dim=48)
    with pytest.raises(ConfigError, match="embed_dim"):
        clipforge.wise(wider, finetuned, 0.5)
    with pytest.raises(ConfigError, match="no classification head"):
        clipforge.wise(zero_shot, zero_shot, 0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        clipforge.wise(zero_shot, finetuned, 1.5)


def test_finetuned_model_loads_with_classnames_and_classify(tuned, tmp_path):
    _, finetuned = tuned
    assert len(finetuned.classnames) == 24 and all(isinstance(n, str) for n in finetuned.classnames)
    logits = finetuned.classify(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 24)
    assert finetuned.encode_text(torch.ones(2, 5, dtype=torch.long)).shape == (2, finetuned.config.embed_dim)
    with pytest.raises(CheckpointError, match="classification head"):
        clipforge.save_pretrained(finetuned, tmp_path / "hf", format="open_clip")
    with pytest.raises(ConfigError, match="no classification head"):
        clipforge.create_model("cpu-vit-tiny-32").classify(torch.randn(1, 3, 32, 32))


def test_ce_trains_only_the_image_tower_and_head(tuned):
    zero_shot, finetuned = tuned
    before, after = zero_shot.state_dict(), finetuned.state_dict()
    text = [k for k in before if k.startswith(("transformer.", "token_embedding", "positional_embedding",
                                                "ln_final", "text_projection", "logit_scale"))]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])


def test_flyp_head_is_the_zero_shot_classifier_of_its_own_text_tower(labelled, tmp_path):
    summary = finetune(_config(labelled, tmp_path, method="flyp"))
    model, _ = clipforge.load(summary["checkpoint"])
    classifier = build_classifier(model, tokenizer_for(model.config), model.classnames, get_templates("simple"),
                                  cache=False)
    with torch.no_grad():
        torch.testing.assert_close(model.head.weight, model.logit_scale.exp() * classifier.t(), rtol=1e-5, atol=1e-6)
    start = clipforge.create_model("cpu-vit-tiny-32", seed=0)
    assert not torch.equal(start.state_dict()["text_projection"], model.state_dict()["text_projection"])


def test_lp_ft_starts_from_a_linear_probe(labelled, tmp_path):
    config = _config(labelled, tmp_path, method="lp-ft")
    derived, classnames = write_training_table(config)
    run = FinetuneRun(FinetuneConfig(**{**config.__dict__, **derived}), classnames)
    zero_shot = FinetuneRun(FinetuneConfig(**{**config.__dict__, **derived, "method": "ce",
                                              "output_dir": str(tmp_path / "zs")}), classnames)
    assert not torch.equal(run.model.head.weight, zero_shot.model.head.weight)
    assert torch.equal(run.model.visual.conv1.weight, zero_shot.model.visual.conv1.weight)


def test_accumulated_cross_entropy_equals_the_full_batch(tuned):
    _, finetuned = tuned
    pixels, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    grads = []
    for accum in (1, 4):
        model = copy.deepcopy(finetuned).train()
        model.text_tower.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
        step = ClassifierStep(model, None, "fp32", accum, 0.0, DistInfo())
        loss = step(pixels, labels)
        grads.append((loss, [p.grad.clone() for p in step.optim_params()]))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    for full, accumulated in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(accumulated, full, rtol=1e-4, atol=1e-7)


def test_config_refuses_what_does_not_apply_and_bad_methods(labelled, tmp_path):
    with pytest.raises(ConfigError, match="lock_text does not apply"):
        finetune(_config(labelled, tmp_path, lock_text=True))
    with pytest.raises(ConfigError, match="method must be one of"):
        finetune(_config(labelled, tmp_path, method="sgd"))
    with pytest.raises(ConfigError, match="data is required"):
        finetune(_config(labelled, tmp_path, data=""))
    with pytest.raises(ConfigError, match="--random-weights"):
        finetune(_config(labelled, tmp_path, random_weights=False))
    assert not (tmp_path / "finetune_data.csv").exists()  # refused before anything was written
    # A run's record names its own table and key column: reused elsewhere, finetune derives them again.
    summary = finetune(_config(labelled, tmp_path / "a", steps=1, key_column="label", train_data="elsewhere.csv"))
    assert summary["steps"] == 1 and (tmp_path / "a" / "finetune_data.csv").is_file()


def test_resume_refuses_changed_labelled_data(labelled, tmp_path):
    finetune(_config(labelled, tmp_path, steps=1))
    with pytest.raises(TrainingError, match="differs from what the run trained on"):
        finetune(_config(labelled, tmp_path, steps=2, styles="faded", resume="latest", resume_override="steps"))
    assert checkpoints.resolve_resume(tmp_path, "latest").name == "step-00000001"


def test_bf16_keeps_frozen_weights_exact_and_the_flyp_head_of_the_saved_weights(labelled, tmp_path):
    start = clipforge.create_model("cpu-vit-tiny-32", seed=0).state_dict()
    ce = clipforge.load(finetune(_config(labelled, tmp_path / "ce", precision="bf16"))["checkpoint"])[0]
    assert torch.equal(ce.state_dict()["text_projection"], start["text_projection"])  # frozen: saved as loaded
    flyp = clipforge.load(finetune(_config(labelled, tmp_path / "flyp", precision="bf16",
                                           method="flyp"))["checkpoint"])[0]
    classifier = build_classifier(flyp, tokenizer_for(flyp.config), flyp.classnames, get_templates("simple"),
                                  cache=False)
    with torch.no_grad():
        torch.testing.assert_close(flyp.head.weight, flyp.logit_scale.exp() * classifier.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_cli_finetune_then_wise_sweep_and_one_alpha(labelled, tmp_path):
    run = tmp_path / "run"
    subprocess.run([*CLI, "finetune", "--model", "cpu-vit-tiny-32", "--random-weights", "--data", str(labelled),
                    "--styles", "filled", "--val-data", str(labelled), "--method", "ce", "--steps", "2",
                    "--batch-size", "8", "--workers", "0", "--output-dir", str(run)], check=True, capture_output=True)
    zero_shot = tmp_path / "zs"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), zero_shot)
    latest = checkpoints.resolve_resume(run, "latest")
    out = subprocess.run([*CLI, "wise", str(zero_shot), str(latest), "--alphas", "0:1:0.5", "--eval", str(labelled),
                          "--out", str(tmp_path / "sweep")], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert set(rows[0]) == {"alpha", "top1_filled", "top1_faded", "top1_mean"}
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_top1_mean" in line]
    assert rows[-1]["top1_filled"] == pytest.approx(last[-1]["val_top1_filled"])
    subprocess.run([*CLI, "wise", str(zero_shot), str(latest), "--alpha", "0.5", "--out", str(tmp_path / "mid")],
                   check=True, capture_output=True)
    assert clipforge.load(tmp_path / "mid")[0].classnames == clipforge.load(latest)[0].classnames
    for flags, message in ((["--alpha", "0.5"], "--out"), (["--alpha", "1.5", "--out", str(tmp_path / "x")], "[0, 1]"),
                           (["--alpha", "0.5", "--out", str(latest)], "one of the two input models")):
        bad = subprocess.run([*CLI, "wise", str(zero_shot), str(latest), *flags], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    bad = subprocess.run([*CLI, "wise", "cpu-vit-tiny-32", str(latest), "--alpha", "0.5", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "registry architecture" in bad.stderr and not (tmp_path / "x").exists()


@pytest.mark.integration
def test_resume_after_sigkill_equals_an_uninterrupted_run(labelled, tmp_path):
    args = ["finetune", "--model", "cpu-vit-tiny-32", "--random-weights", "--data", str(labelled), "--method", "ce",
            "--steps", "24", "--batch-size", "8", "--workers", "0", "--save-every", "1", "--keep-last", "2",
            "--lr", "1e-3"]
    whole = tmp_path / "whole"
    subprocess.run([*CLI, *args, "--output-dir", str(whole)], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *args, "--output-dir", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while not (killed / checkpoints.LATEST_FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints.resolve_resume(killed, "latest").name != "step-00000024"  # killed mid-run
    subprocess.run([*CLI, *args, "--output-dir", str(killed), "--resume", "latest"], check=True, capture_output=True)
    expected = clipforge.load(checkpoints.resolve_resume(whole, "latest"))[0].state_dict()
    resumed = clipforge.load(checkpoints.resolve_resume(killed, "latest"))[0].state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in expected.items())


@pytest.mark.integration
def test_ddp_two_processes_equal_one(labelled, tmp_path):
    common = ["finetune", "--model", "cpu-vit-tiny-32", "--random-weights", "--data", str(labelled), "--method", "ce",
              "--workers", "0", "--steps", "2", "--warmup", "1", "--lr", "1e-3", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([*CLI, *common, "--batch-size", "16", "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "clipforge.cli.main", *common, "--batch-size", "8", "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("one", "two")]
    assert len(losses[0]) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(*losses))
    weights = [clipforge.load(tmp_path / run / "step-00000002")[0].state_dict() for run in ("one", "two")]
    # AdamW's first steps amplify all-reduce order noise where a gradient is near zero (see test_train's twin).
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4
