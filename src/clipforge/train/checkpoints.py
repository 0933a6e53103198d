"""Atomic, resumable training checkpoints: a loadable model directory plus the full training state."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import TrainingError
from clipforge.io import write_atomic

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
LATEST_FILE = "latest"
STATE_FILE = "train_state.pt"


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, write_model: Any, train_state: dict[str, Any], keep_last: int) -> Path:
    """Write step-NNNNNNNN/ via a temp dir + fsync + rename, point `latest` at it, prune to `keep_last`.

    `write_model(directory)` writes the model files (a directory `clipforge.load` can read).
    A kill at any moment leaves either the old or the new checkpoint complete, never a half one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:08d}"
    tmp = run_dir / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(tmp)
    torch.save(train_state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step: move the old one aside first, so a crash leaves one of them
        stale = run_dir / f".step-{step:08d}.old"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_tree(run_dir)
    write_atomic(run_dir / LATEST_FILE, final.name + "\n")
    if keep_last > 0:
        # The new checkpoint always stays (a run resumed from an older step writes lower numbers).
        others = [c for c in list_checkpoints(run_dir) if c != final]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temp dirs are never listed)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint directory for `--resume latest`, `auto` (None: no checkpoint yet, start) or a path."""
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise TrainingError(f"resume checkpoint {path} has no {STATE_FILE}")
        return path
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = [p for p in list_checkpoints(run_dir) if (p / STATE_FILE).is_file()]
    if complete:
        return complete[-1]
    if resume == "auto":
        return None
    raise TrainingError(f"--resume latest: no checkpoint in {run_dir} (step-NNNNNNNN/ folders with {STATE_FILE}). "
                        "Leave out --resume to start a new run there, or pass --resume auto to start one when "
                        "there is no checkpoint and resume otherwise")


def load_train_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer, schedule, RNG and data-position state saved with a checkpoint."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """JSON written atomically."""
    write_atomic(path, json.dumps(payload, indent=1))
