"""Training through the CLI and across sessions: unreadable data stops the run, a resume keeps the run's recorded
settings (or overrides them on request), --resume auto, a finished run, --device, captions cut to the context."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import clipforge
from clipforge.errors import TrainingError
from clipforge.train import checkpoints
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train
from synthetic import make_caption_set


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_caption_set(root, per_concept=1, seed=0)
    make_caption_set(root, per_concept=1, seed=1, name="val.csv")
    return root


def config(root: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(model="cpu-vit-tiny-32", train_data=str(root / "train.csv"), batch_size=8, workers=0,
                output_dir=str(out), warmup=1, lr=1e-3, seed=0, steps=2)
    return TrainConfig(**{**base, **overrides})


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge.cli.main", "train", *args], capture_output=True,
                          text=True, timeout=timeout)


def summary_json(stdout: str) -> dict:
    """The summary the CLI prints last, parsed strictly (NaN and Infinity are not JSON)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(stdout[stdout.index("\n{") + 1:], parse_constant=refuse)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_csv_whose_images_are_all_missing_stops_naming_them(shapes, tmp_path):
    # Paths written relative to the working folder, not to the CSV's folder: none resolves.
    rows = (shapes / "train.csv").read_text().splitlines()
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "captions.csv"
    csv.write_text("\n".join([rows[0]] + [f"{shapes.name}/{row}" for row in rows[1:]]) + "\n")
    result = cli("--model", "cpu-vit-tiny-32", "--train-data", str(csv), "--batch-size", "8", "--workers", "0",
                 "--steps", "3", "--output-dir", str(tmp_path / "run"), timeout=90)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no usable sample in epoch 0" in result.stderr and "missing_file=24" in result.stderr
    looked = [str(tmp_path / "lists" / shapes.name / row.split(",")[0]) for row in rows[1:]]
    assert sum(path in result.stderr for path in looked) == 3  # the first few, where it looked for them
    assert f"relative to the CSV's own folder ({tmp_path / 'lists'})" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_with_another_learning_rate_is_refused_through_the_cli(shapes, tmp_path):
    out = tmp_path / "run"
    train(config(shapes, out, lr=2e-4))
    recorded = (out / "config.json").read_bytes()
    result = cli("--config", str(out / "config.json"), "--resume", "latest", "--lr", "0.5")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lr (--lr): recorded 0.0002, given 0.5" in result.stderr
    assert "--resume-override lr" in result.stderr and "Traceback" not in result.stderr
    assert (out / "config.json").read_bytes() == recorded
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["step-00000002"]
    again = cli("--config", str(out / "config.json"), "--resume", "latest")  # the recorded settings resume
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary_json(again.stdout)["already_finished"] is True


def test_resume_refuses_more_steps_and_a_missing_val_data_naming_each(shapes, tmp_path):
    out = tmp_path / "run"
    train(config(shapes, out, val_data=str(shapes / "val.csv"), max_steps_this_run=1))
    recorded = (out / "config.json").read_bytes()
    with pytest.raises(TrainingError) as refused:
        train(config(shapes, out, steps=40, resume="latest"))  # a longer cosine schedule; no val_data
    message = str(refused.value)
    assert "steps (--steps): recorded 2, given 40" in message
    assert f'val_data (--val-data): recorded "{shapes / "val.csv"}", given ""' in message
    assert "--resume-override val_data,steps" in message
    assert (out / "config.json").read_bytes() == recorded
    with pytest.raises(TrainingError, match="val_data"):  # overriding one field does not allow the other
        train(config(shapes, out, steps=40, resume="latest", resume_override="steps"))


def test_an_override_is_applied_logged_and_recorded(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(shapes, out, max_steps_this_run=1))
    summary = train(config(shapes, out, steps=3, resume="latest", resume_override="steps", save_every=1))
    assert summary["steps"] == 3
    assert "overrides the run's record (--resume-override): steps 2 -> 3" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 1, "resume_override": {"steps": {"recorded": 2, "new": 3}}} in records
    saved = json.loads((out / "config.json").read_text())
    # The record holds the new value, not the permission: a later resume from config.json must match it again.
    assert saved["steps"] == 3 and saved["resume_override"] == ""
    with pytest.raises(TrainingError, match="steps"):
        train(TrainConfig(**{**saved, "resume": "latest", "steps": 4}))
    with pytest.raises(ValueError, match="'stpes' is not a TrainConfig field .did you mean 'steps'"):
        train(config(shapes, out, resume="latest", resume_override="stpes"))


def test_resume_auto_starts_then_resumes_and_latest_needs_a_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="no checkpoint in .*--resume auto"):
        train(config(shapes, out, resume="latest"))
    first = train(config(shapes, out, resume="auto", max_steps_this_run=1))  # nothing there yet: a new run
    assert first["steps"] == 1
    second = train(config(shapes, out, resume="auto"))  # after a restart: the same command resumes
    assert second["steps"] == 2 and sorted(losses(out)) == [1, 2]
    straight = train(config(shapes, tmp_path / "straight"))
    assert abs(losses(tmp_path / "straight")[2] - losses(out)[2]) <= 1e-6 and straight["steps"] == 2


def test_resume_of_a_finished_run_prints_valid_json_and_says_so(shapes, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "cpu-vit-tiny-32", "--train-data", str(shapes / "train.csv"), "--batch-size", "8",
            "--workers", "0", "--steps", "2", "--warmup", "1", "--output-dir", str(out)]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    final = summary_json(done.stdout)["final_loss"]
    again = cli(*args, "--resume", "latest")
    assert again.returncode == 0, again.stderr[-2000:]
    summary = summary_json(again.stdout)
    assert summary["final_loss"] == final and summary["already_finished"] is True and summary["steps"] == 2
    assert summary["checkpoint"].endswith("step-00000002")
    assert "already finished" in again.stdout and "nothing to train" in again.stdout


def test_device_flag_trains_where_asked_and_refuses_a_missing_gpu(shapes, tmp_path):
    summary = train(config(shapes, tmp_path / "cpu", device="cpu", steps=1))
    assert summary["steps"] == 1 and json.loads((tmp_path / "cpu" / "config.json").read_text())["device"] == "cpu"
    result = cli("--device", "cuda:99", "--train-data", str(shapes / "train.csv"), "--model", "cpu-vit-tiny-32",
                 "--output-dir", str(tmp_path / "gpu"))
    assert result.returncode == 2 and "device 'cuda:99'" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "gpu").exists()


def test_truncating_tokenizer_counts_exactly_the_texts_it_cuts():
    from clipforge.data.captions import TruncatingTokenizer

    tokenizer = clipforge.get_tokenizer("cpu-vit-tiny-32")
    context = tokenizer.context_length
    fits, one_over = "a " * (context - 2), "a " * (context - 1)  # SOT + text + EOT
    texts = ["a red circle", fits, one_over, "a blue square " * 20]
    tokens, cut = TruncatingTokenizer(tokenizer).counted(texts)
    assert cut == 2 and (tokens == tokenizer(texts, truncate=True)).all()
    assert TruncatingTokenizer(tokenizer).counted(texts[:2])[1] == 0


@pytest.mark.parametrize("decoded_cache", [False, True])
def test_captions_cut_to_the_context_are_counted_and_reported(shapes, tmp_path, capsys, decoded_cache):
    rows = (shapes / "train.csv").read_text().splitlines()
    long = [f"{row.split(',')[0]},{'a very long caption ' * 12},{row.split(',')[2]}" for row in rows[1:6]]
    (tmp_path / "captions.csv").write_text("\n".join([rows[0], *long, *rows[6:]]) + "\n")
    (tmp_path / "images").symlink_to(shapes / "images")
    out = tmp_path / "run"
    summary = train(config(tmp_path, out, train_data=str(tmp_path / "captions.csv"), steps=0, epochs=2,
                           decoded_cache=decoded_cache, decoded_cache_dir=str(tmp_path / "cache")))
    assert summary["steps"] == 6 and summary["captions_truncated"] == 10  # each caption read once an epoch
    printed = capsys.readouterr().out
    assert "epoch 0: 5 captions cut to the 32-token context" in printed
    assert "captions cut to the 32-token context: 10" in printed  # the final "done" line
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 6, "captions_truncated": 10} in records


def test_a_checkpoint_path_is_checked_against_its_own_runs_record(shapes, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    train(config(shapes, first, max_steps_this_run=1))
    saved = json.loads((first / "config.json").read_text())
    # The record holds the run's settings, not this session's: its step limit and resume flags are left out.
    assert saved["max_steps_this_run"] == 0 and saved["resume"] == "" and saved["resume_override"] == ""
    train(config(shapes, other, lr=5e-4))  # another run, recorded in the output folder used below
    step_one = checkpoints.list_checkpoints(first)[-1]
    summary = train(config(shapes, other, resume=str(step_one)))  # matches first's record, not other's
    assert summary["steps"] == 2
    with pytest.raises(TrainingError, match=r"lr \(--lr\): recorded 0.001, given 0.0005"):
        train(config(shapes, other, lr=5e-4, resume=str(step_one)))
    finished = train(TrainConfig(**{**saved, "resume": "latest"}))  # config.json repeats the run: it finishes
    assert finished["steps"] == 2


def test_an_epoch_run_over_changed_data_is_refused_not_restretched(shapes, tmp_path):
    lines = (shapes / "train.csv").read_text().splitlines()
    (tmp_path / "images").symlink_to(shapes / "images")
    table, out = tmp_path / "train.csv", tmp_path / "run"
    table.write_text("\n".join(lines[:17]) + "\n")  # 16 rows: 2 steps an epoch at batch 8
    train(config(shapes, out, train_data=str(table), steps=0, epochs=2, max_steps_this_run=1))
    table.write_text("\n".join(lines[:25]) + "\n")  # the table grew: 2 epochs would now be 6 steps, not 4
    before = (out / "config.json").read_bytes()
    with pytest.raises(TrainingError, match=r"schedule was 4 steps.*now make 6"):
        train(config(shapes, out, train_data=str(table), steps=0, epochs=2, resume="latest"))
    assert (out / "config.json").read_bytes() == before
    kept = train(config(shapes, out, train_data=str(table), steps=4, epochs=2, resume="latest",
                        resume_override="steps"))
    assert kept["steps"] == 4


def test_a_resume_at_the_end_of_an_epoch_goes_on_to_the_next(shapes, tmp_path):
    out = tmp_path / "run"  # 24 pairs at batch 8: 3 steps an epoch, and the first session stops at its end
    train(config(shapes, out, steps=6, max_steps_this_run=3))
    assert train(config(shapes, out, steps=6, resume="latest"))["steps"] == 6
