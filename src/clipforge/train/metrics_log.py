"""Per-step metrics of a training run: metrics.jsonl, plus TensorBoard when it is installed (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge.io import json_safe


class MetricsLog:
    """metrics.jsonl per step, plus TensorBoard when it is installed (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.handle = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (and mirror scalars to TensorBoard)."""
        if not self.enabled:
            return
        # JSON has no NaN/inf: such values (e.g. top-5 with fewer than 5 classes) are written as null.
        record = json_safe(record)
        self.handle.write(json.dumps(record, allow_nan=False) + "\n")
        self.handle.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        if self.handle:
            self.handle.close()
        if self.tb is not None:
            self.tb.close()
