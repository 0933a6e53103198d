"""Errors a user can fix. The CLI prints any `ClipforgeError` as one message (exit 2), with a traceback only
under `--debug`; anything else is a bug and keeps its traceback.

Each area has its own class, and each class also derives from the builtin it replaces (ValueError,
RuntimeError, ImportError), so `except ValueError` in callers' code keeps working.
"""
from __future__ import annotations


class ClipforgeError(Exception):
    """Base of every error whose message tells the user what to change."""


class ConfigError(ClipforgeError, ValueError):
    """An option, argument or configuration value is invalid."""


class CheckpointError(ClipforgeError, ValueError):
    """A checkpoint or pretrained tag cannot be read, or cannot be loaded exactly."""


class TokenizerError(ClipforgeError, ValueError):
    """Text cannot be tokenised as asked, or a vocabulary file is unusable."""


class TextTooLong(TokenizerError):
    """A text has more tokens than the model's context; pass truncate=True (CLI: --truncate) to cut it."""


class DataError(ClipforgeError, ValueError):
    """Input data (images, captions, label files, shards) is missing or unusable."""


class SampleError(DataError):
    """One sample is unusable; `reason` names the skip counter it goes to (see data.images)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DatasetError(ClipforgeError, RuntimeError):
    """Building a real corpus (emoji, Tux Paint, icons) failed: a fetch, a checksum or an unpack."""


class EvaluationError(ClipforgeError, ValueError):
    """An evaluation cannot run on the data or settings given."""


class TrainingError(ClipforgeError, ValueError):
    """A training run cannot start or continue as configured."""


class TrainingDiverged(ClipforgeError, RuntimeError):
    """The loss became non-finite; the message names the last good checkpoint."""


class SearchError(ClipforgeError, ValueError):
    """An index or a query is unusable."""


class IndexLocked(ClipforgeError, RuntimeError):
    """Another `clipforge index` process is updating the same index."""


class ExportError(ClipforgeError, RuntimeError):
    """An export cannot be written, or the written graph does not match the model."""


class MissingDependency(ClipforgeError, ImportError):
    """An optional extra (faiss-cpu, onnx, pyarrow, ...) is needed; the message names the pip command."""
