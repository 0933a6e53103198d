"""Shared by the binding tests: a run's losses, and the kill -9 check (a binding killed through the real CLI
resumes to the uninterrupted run's losses)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import clipforge
from clipforge.bind import BindConfig, bind
from clipforge.train import checkpoints


def losses(run: Path) -> dict[int, float]:
    """Step -> loss of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def check_killed_binding_resumes(base: dict, flags: list[str], tmp_path: Path) -> None:
    """Bind `base` (10 steps) straight; run it through the CLI (`flags`: its settings), SIGKILL it after three
    checkpoints, resume: every step after the resume has the straight run's loss, and the result binds."""
    bind(BindConfig(**base, output_dir=str(tmp_path / "straight")))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clipforge.cli.main", "bind", "--model", base["model"], "--train-data",
           base["train_data"], "--key-column", "key", "--steps", "10", "--save-every", "1", "--output-dir", str(out),
           *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(checkpoints.list_checkpoints(out / "run")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = int(checkpoints.resolve_resume(out / "run", "latest").name.split("-")[1])
    assert resumed_from < 10, "the run finished before the kill: nothing was resumed"
    summary = bind(BindConfig(**base, output_dir=str(out), resume="latest"))
    straight, killed = losses(tmp_path / "straight" / "run"), losses(out / "run")
    assert sorted(killed) == list(range(1, 11))
    for step in range(resumed_from + 1, 11):
        assert abs(straight[step] - killed[step]) <= 1e-6, step
    assert clipforge.load(summary["bound"])[0].modalities == ("image", "text", base["modality"])
