"""Training: exact accumulation, resume, crash-safe checkpoints, bad samples, DDP, divergence, learning."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.distributed import DistInfo
from clipforge.errors import TrainingDiverged
from clipforge.loss import ContrastiveLoss
from clipforge.train import checkpoints
from clipforge.train.config import TrainConfig
from clipforge.train.step import TrainStep
from clipforge.train.trainer import train
from conftest import random_tokens
from synthetic import make_caption_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_caption_set(root, per_concept=8, seed=0)
    make_caption_set(root, per_concept=1, seed=1, name="val.csv")
    return root


def config(root: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(model="cpu-vit-tiny-32", train_data=str(root / "train.csv"), batch_size=16, workers=0,
                output_dir=str(out), warmup=3, lr=1e-3, seed=0)
    return TrainConfig(**{**base, **overrides})


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulation_equals_large_batch_update(dtype):
    base = clipforge.create_model("cpu-vit-tiny-32", seed=0).to(dtype)
    pixels = torch.randn(64, 3, 32, 32, dtype=dtype)
    tokens = random_tokens(64, 32, [5 + i % 20 for i in range(64)])
    updated, grads = [], []
    for accum in (1, 4):
        model = copy.deepcopy(base)
        step = TrainStep(model, ContrastiveLoss(), "fp32", accum, 0.0, DistInfo())
        optimizer = torch.optim.AdamW(step.optim_params(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)  # trainer's
        step(pixels, tokens)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        optimizer.step()
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)
    # fp32 summation order differs between one batch and four micro-batches; float64 shows the
    # algorithm itself is exact (Adam's first step divides by |g|, magnifying rounding of tiny grads).
    assert (updated[0] - updated[1]).abs().max() < (1e-4 if dtype == torch.float32 else 1e-9)


def test_resume_continues_exactly(shapes, tmp_path):
    train(config(shapes, tmp_path / "straight", steps=20))
    train(config(shapes, tmp_path / "split", steps=20, max_steps_this_run=10))
    assert checkpoints.resolve_resume(tmp_path / "split", "latest").name == "step-00000010"
    train(config(shapes, tmp_path / "split", steps=20, resume="latest"))
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 21))
    for step in range(11, 21):
        assert abs(straight[step] - split[step]) <= 1e-6, step


def test_failed_checkpoint_write_keeps_latest_loadable(shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(config(shapes, out, steps=2, save_every=1))
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoints.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(shapes, out, steps=4, save_every=1, resume="latest", resume_override="steps"))
    latest = checkpoints.resolve_resume(out, "latest")
    assert latest.name == "step-00000002"
    model, _ = clipforge.load(latest)
    assert model.context_length == 32


@pytest.mark.integration
def test_sigkill_during_training_leaves_loadable_latest(shapes, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clipforge.cli.main", "train", "--model", "cpu-vit-tiny-32", "--train-data",
           str(shapes / "train.csv"), "--batch-size", "8", "--workers", "0", "--steps", "400", "--save-every", "1",
           "--keep-last", "2", "--output-dir", str(out)]
    for delay in (0.05, 0.3, 0.7):  # kills land at varied points of the save cycle
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        deadline = time.time() + 120
        while not (out / checkpoints.LATEST_FILE).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = checkpoints.resolve_resume(out, "latest")
        clipforge.load(latest)
        checkpoints.load_train_state(latest)
        assert len(checkpoints.list_checkpoints(out)) <= 3


def _bad_rows(root: Path) -> list[tuple[str, str]]:
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    good = (root / "images").glob("*.png").__next__().read_bytes()
    (root / "bad" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "bad" / "text.png").write_bytes(b"this is not an image")
    return [("bad/missing.png", "a red circle"), ("bad/empty.png", "a red circle"),
            ("bad/truncated.png", "a blue square"), ("bad/text.png", "a blue square"),
            ("images/" + next((root / "images").glob("*.png")).name, "   ")]


def test_bad_samples_in_csv_are_skipped_and_counted(shapes, tmp_path):
    root = tmp_path / "data"
    import shutil

    shutil.copytree(shapes, root)
    lines = (root / "train.csv").read_text().splitlines()
    bad = [f"{path},{caption},bad{i}" for i, (path, caption) in enumerate(_bad_rows(root))]
    (root / "mixed.csv").write_text("\n".join(lines[:40] + bad) + "\n")
    summary = train(config(root, tmp_path / "run", train_data=str(root / "mixed.csv"), batch_size=8, epochs=1))
    assert summary["steps"] >= 4
    skipped = summary["skipped"]
    assert skipped.get("missing_file") == 1 and skipped.get("empty_file") == 1
    assert skipped.get("corrupt_image") == 2 and skipped.get("empty_caption") == 1
    # Named, not only counted: in the summary and in the run's skip log, each file once.
    named = {reason: sorted(Path(p).name for p in paths) for reason, paths in summary["skipped_files"].items()}
    assert named["missing_file"] == ["missing.png"] and named["empty_file"] == ["empty.png"]
    assert named["corrupt_image"] == ["text.png", "truncated.png"] and len(named["empty_caption"]) == 1
    log = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert summary["skip_log"] == str(tmp_path / "run" / "skipped.jsonl") and len(log) == 5
    assert {(Path(e["path"]).name, e["reason"]) for e in log} >= {("missing.png", "missing_file"),
                                                                   ("text.png", "corrupt_image")}


def test_undecodable_captions_are_reported_like_image_skips(shapes, tmp_path, capsys):
    lines = (shapes / "train.csv").read_bytes().splitlines()
    header, rows = lines[0], lines[1:40]
    image = rows[0].split(b",")[0]
    bad = [image + b",caf\xe9 au lait\xff,bad0", image + b",   ,bad0"]  # not UTF-8; blank, beside good captions
    (tmp_path / "captions.csv").write_bytes(b"\n".join([header, *rows, *bad]) + b"\n")
    for path in shapes.iterdir():
        if path.is_dir():
            (tmp_path / path.name).symlink_to(path)
    summary = train(config(tmp_path, tmp_path / "run", train_data=str(tmp_path / "captions.csv"), batch_size=8,
                           steps=2))
    assert summary["captions_dropped"] == {"bad_encoding": 1, "empty_caption": 1}
    assert summary["skipped"] == {}  # the image keeps its good caption
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "captions_dropped": {"bad_encoding": 1, "empty_caption": 1}} in records
    assert "dropped captions: bad_encoding 1, empty_caption 1" in capsys.readouterr().out  # tqdm.write


def test_bad_samples_in_shard_are_skipped_and_counted(shapes, tmp_path):
    shard = tmp_path / "shard-000.tar"
    images = sorted((shapes / "images").glob("train_*.png"))[:24]
    with tarfile.open(shard, "w") as tar:
        caption, corrupt = tmp_path / "c.txt", tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG broken")
        for i, path in enumerate(images):
            tar.add(corrupt if i == 5 else path, arcname=f"s{i:04d}.png")
            words = " ".join(path.stem.split("_")[1:3])
            caption.write_text("" if i == 3 else f"{words}|  " if i == 7 else words)  # 7: a blank beside a good one
            tar.add(caption, arcname=f"s{i:04d}.txt")
    summary = train(config(shapes, tmp_path / "run", train_data=str(shard), batch_size=8, steps=2,
                           caption_separator="|"))
    assert summary["steps"] == 2
    assert summary["skipped"].get("empty_caption") == 1 and summary["skipped"].get("corrupt_image") == 1
    assert summary["captions_dropped"] == {"empty_caption": 1}  # streamed shards report them too


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(config(shapes, out, steps=2, save_every=1))
    calls = {"n": 0}
    real_forward = ContrastiveLoss.forward

    def poisoned(self, *args):
        calls["n"] += 1
        loss = real_forward(self, *args)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(ContrastiveLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="step-00000003"):
        train(config(shapes, out, steps=6, save_every=1, resume="latest", resume_override="steps"))
    assert checkpoints.resolve_resume(out, "latest").name == "step-00000003"
    clipforge.load(checkpoints.resolve_resume(out, "latest"))


@pytest.mark.integration
def test_ddp_two_processes_equal_one(shapes, tmp_path):
    common = ["--model", "cpu-vit-tiny-32", "--train-data", str(shapes / "train.csv"), "--workers", "0",
              "--steps", "2", "--warmup", "1", "--lr", "1e-3", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "clipforge.cli.main", "train", *common, "--batch-size", "16",
                          "--output-dir", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "clipforge.cli.main", "train", *common, "--batch-size", "8",
                          "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in (1, 2))
    wa = load_file(str(tmp_path / "one" / "step-00000002" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "step-00000002" / "model.safetensors"))
    # AdamW's first steps move each weight by about lr * g / (|g| + eps): where a gradient is near zero, the
    # reduction-order noise of gloo's all-reduce (~1e-9) moves it by a sizeable part of lr (measured 2.8e-5
    # here at lr 1e-3), so weights are held to a tenth of one step; the losses above stay within 1e-5.
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_ddp_skips_are_counted_and_named_across_ranks(shapes, tmp_path):
    lines = (shapes / "train.csv").read_text().splitlines()
    gone = [f"images/gone{i}.png,a red circle,gone{i}" for i in range(6)]
    (tmp_path / "mixed.csv").write_text("\n".join(lines[:35] + gone) + "\n")  # 34 + 6: five global batches
    (tmp_path / "images").symlink_to(shapes / "images")
    eight = [f"images/lost{i}.png,a red circle,lost{i}" for i in range(8)]  # one global batch
    (tmp_path / "missing.csv").write_text("\n".join(lines[:1] + eight) + "\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "clipforge.cli.main", "train", "--model", "cpu-vit-tiny-32", "--workers", "0", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*torchrun, "--train-data", str(tmp_path / "mixed.csv"), "--epochs", "1",
                          "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout[run.stdout.index("\n{") + 1:])
    assert summary["skipped"] == {"missing_file": 6}  # both ranks' counts, not rank 0's share
    logged = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in logged) == [f"gone{i}.png" for i in range(6)]
    # Nothing usable on any rank: both processes stop with the error (none is left waiting), within seconds.
    stop = subprocess.run([*torchrun, "--train-data", str(tmp_path / "missing.csv"), "--steps", "3",
                           "--output-dir", str(tmp_path / "stop")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert stop.returncode != 0 and "no usable sample" in stop.stderr and "lost" in stop.stderr


def test_learns_synthetic_captions(shapes, tmp_path):
    labels = tmp_path / "val_labels.csv"
    rows = [line.split(",") for line in (shapes / "val.csv").read_text().splitlines()[1:]]
    labels.write_text("image,label\n" + "".join(f"{shapes / image},{caption[2:]}\n" for image, caption, _ in rows))
    summary = train(config(shapes, tmp_path / "run", val_data=str(shapes / "val.csv"), batch_size=24, steps=100,
                           warmup=10, lr=2e-3, key_column="key", val_zeroshot=str(labels),
                           val_zeroshot_templates="label"))
    val = summary["validation"]
    chance = 1 / val["pairs"]
    assert val["image_to_text_r1"] > 8 * chance and val["text_to_image_r1"] > 8 * chance, val
    assert val["zeroshot_top1"] > 4 * chance, val  # zero-shot with bare class names ("red circle")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_zeroshot_top1" in record for record in logged)


def test_lit_minilm_locked_text_tower(shapes, tmp_path):
    before = clipforge.create_model("cpu-vit-tiny-32", text_tower="minilm", seed=0).state_dict()
    summary = train(config(shapes, tmp_path / "lit", text_tower="minilm", lock_text=True, steps=3, batch_size=8))
    after = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    body = [k for k in after if k.startswith("text_tower.") and not k.startswith("text_tower.projection")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)  # pretrained body frozen
    assert not torch.equal(before["text_tower.projection.weight"], after["text_tower.projection.weight"])
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    tokenizer = clipforge.get_tokenizer(summary["checkpoint"])
    assert tokenizer(["a red circle"])[0, 0] == 101  # MiniLM's [CLS]: the run's own tokenizer was saved


def test_lock_image_tower(shapes, tmp_path):
    before = clipforge.create_model("cpu-vit-tiny-32", seed=0).state_dict()
    summary = train(config(shapes, tmp_path / "locked", lock_image=True, steps=2, batch_size=8))
    after = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    assert torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])


def test_trained_bpe_vocab_travels_with_the_model(shapes, tmp_path):
    from clipforge.text import train_bpe

    captions = [line.split(",")[1] for line in (shapes / "train.csv").read_text().splitlines()[1:]]
    vocab = tmp_path / "vocab.txt.gz"
    tokenizer = train_bpe(captions * 5, vocab_size=600, out_path=vocab, context_length=32)
    summary = train(config(shapes, tmp_path / "bpe", bpe_vocab=str(vocab), steps=2, batch_size=8))
    model, _ = clipforge.load(summary["checkpoint"])
    assert model.config.text.vocab_size == tokenizer.vocab_size <= 600
    reloaded = clipforge.get_tokenizer(summary["checkpoint"])
    assert torch.equal(reloaded(captions[:5]), tokenizer(captions[:5]))


def test_bf16_resume_is_exact_and_temperature_cap_reaches_checkpoint(shapes, tmp_path):
    common = dict(steps=6, precision="bf16", batch_size=8, model_overrides={"logit_scale_init": 4.7})
    train(config(shapes, tmp_path / "straight", **common))
    train(config(shapes, tmp_path / "split", max_steps_this_run=3, **common))
    train(config(shapes, tmp_path / "split", resume="latest", **common))
    a = load_file(str(tmp_path / "straight" / "step-00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "step-00000006" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert a["logit_scale"].item() <= math.log(100) + 1e-6  # init 4.7 > ln 100: clamped in the saved master


def test_locked_resnet_tower_keeps_batchnorm_statistics(shapes, tmp_path):
    before = clipforge.create_model("cpu-rn-tiny-64", seed=0).state_dict()
    summary = train(config(shapes, tmp_path / "rn", model="cpu-rn-tiny-64", lock_image=True, steps=2, batch_size=8))
    after = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    frozen = [k for k in after if k.startswith("visual.") and not k.startswith("visual.attnpool.c_proj")]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["visual.attnpool.c_proj.weight"], after["visual.attnpool.c_proj.weight"])


def test_resaving_an_older_step_keeps_it_and_points_latest_at_it(tmp_path):
    def write(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"x")

    for step in (100, 200, 300):
        checkpoints.save_checkpoint(tmp_path, step, write, {"step": step}, keep_last=2)
    checkpoints.save_checkpoint(tmp_path, 150, write, {"step": 150}, keep_last=1)
    assert checkpoints.resolve_resume(tmp_path, "latest").name == "step-00000150"
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000150"]


def test_config_file_values_are_type_checked(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"lr": "1e-3"}))
    with pytest.raises(ValueError, match="lr must be float"):
        TrainConfig.from_json(tmp_path / "run.json")
    (tmp_path / "run.json").write_text(json.dumps({"lr": 1, "steps": 5, "lock_text": True}))
    assert TrainConfig.from_json(tmp_path / "run.json").lr == 1.0


def test_siglip_training_runs_with_its_own_temperature(shapes, tmp_path):
    summary = train(config(shapes, tmp_path / "siglip", loss="siglip", steps=3, batch_size=8))
    logged = [json.loads(line) for line in (tmp_path / "siglip" / "metrics.jsonl").read_text().splitlines()]
    assert abs(logged[0]["logit_scale"] - 10.0) < 0.1 and math.isfinite(summary["final_loss"])
    model, _ = clipforge.load(summary["checkpoint"])  # the learned bias is a model weight, saved with the others
    assert model.logit_bias is not None and model.logit_bias.item() != -10.0


def test_locked_text_cache_gives_the_uncached_gradients():
    """A locked text tower's cached features give the same loss and grads as running the tower."""
    model = clipforge.create_model("cpu-vit-tiny-32", seed=0)
    model.lock_text_tower()
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = clipforge.tokenize(["a cat", "a dog", "a cat", "a red car", "a dog", "tea"],
                                context_length=model.context_length)
    step = TrainStep(model, ContrastiveLoss(), "fp32", 1, 0.0, DistInfo())
    cache = step.text_cache
    assert cache is not None
    results = []
    for use_cache in (True, False, True):
        step.text_cache = cache if use_cache else None
        loss = step(pixels, tokens)
        results.append((loss, [p.grad.clone() for p in step.trainable]))
    assert cache.misses == 4 and cache.hits == 8  # 4 distinct captions, each encoded once
    projection = model.text_tower.text_projection
    assert projection.grad is not None and projection.grad.abs().sum() > 0
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) < 1e-6
        for a, b in zip(results[0][1], grads):
            assert torch.allclose(a, b, atol=1e-6)
