"""Resuming a run: its settings must match what the run recorded, unless the user names the fields to change."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from clipforge.errors import TrainingError
from clipforge.train.config import TrainConfig, override_names

# Fields a resume may change without an override: how this session is launched, where and how often the run
# writes, and how fast the data is read. Every other field changes what is trained or measured.
SESSION_FIELDS = frozenset({"resume", "resume_override", "device", "workers", "output_dir", "max_steps_this_run",
                            "save_every", "keep_last", "log_every", "decoded_cache_dir"})
CONFIG_FILE = "config.json"

Changes = dict[str, tuple[Any, Any]]  # field -> (recorded value, new value), as JSON values


def recorded_config(run_dir: Path, state: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The run's recorded settings and their file: its config.json, else the checkpoint's own copy (file None)."""
    path = run_dir / CONFIG_FILE
    if path.is_file():
        return json.loads(path.read_text()), path
    return dict(state.get("config", {})), None


def differences(recorded: dict[str, Any], config: TrainConfig) -> Changes:
    """The fields, session fields aside, whose value differs from the record (a field it lacks had its default)."""
    given = _as_json(config)
    defaults = _as_json(type(config)())
    # A resumed shard stream continues exactly only with the same number of workers (see data.shards).
    exempt = SESSION_FIELDS - {"workers"} if ".tar" in config.train_data else SESSION_FIELDS
    changes = {}
    for name, value in given.items():
        old = recorded.get(name, defaults[name])
        if name not in exempt and old != value:
            changes[name] = (old, value)
    return changes


def check_resume(config: TrainConfig, checkpoint: Path, state: dict[str, Any],
                 asked: dict[str, str] | None = None) -> Changes:
    """The changes `resume_override` allows; a TrainingError naming every other change, with both values.

    `config` holds resolved values; `asked` names the fields given as "auto" (precision), for the message."""
    # The record of the run the checkpoint belongs to (for a checkpoint path, not the output folder's).
    recorded, source = recorded_config(checkpoint.parent, state)
    changes = differences(recorded, config)
    allowed = set(override_names(config.resume_override))
    refused = {name: change for name, change in changes.items() if name not in allowed}
    if not refused:
        return changes
    asked = asked or {}
    lines = "".join(f"\n  {name} (--{name.replace('_', '-')}): recorded {json.dumps(old)}, given {json.dumps(new)}"
                    + (f" (--{name} {asked[name]} on this machine)" if name in asked else "")
                    for name, (old, new) in refused.items())
    again = f"--config {source} --resume {config.resume}" if source else "the recorded values"
    raise TrainingError(
        f"--resume {config.resume} ({checkpoint}): the settings differ from the run's record "
        f"({source or 'the checkpoint'}), and a resume continues the run as recorded:{lines}\n"
        f"Resume with {again}, or change them on purpose with --resume-override {','.join(refused)}")


def check_schedule(config: TrainConfig, recorded: int | None, total_steps: int, checkpoint: Path) -> None:
    """Refuse a resume whose schedule length changed although no field did: `epochs` over a grown or shrunk
    table would re-stretch the cosine schedule mid-run (a checkpoint before this was recorded: not checked)."""
    if recorded is None or recorded == total_steps or {"steps", "epochs"} & set(override_names(
            config.resume_override)):
        return
    raise TrainingError(
        f"--resume {config.resume} ({checkpoint}): the run's schedule was {recorded} steps, but "
        f"{config.epochs} epoch(s) of {config.train_data} now make {total_steps} (the data changed), which would "
        f"re-stretch the learning-rate schedule: resume with --steps {recorded} --resume-override steps to keep "
        "it, or --resume-override epochs to accept the new length")


def _as_json(config: TrainConfig) -> dict[str, Any]:
    """The config's fields as config.json holds them (tuples as lists, floats as read back)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
