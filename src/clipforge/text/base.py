"""The tokenizer interface every text tower's tokenizer implements (CLIP's BPE, MiniLM's WordPiece)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

DEFAULT_CONTEXT_LENGTH = 77  # OpenAI's text context: SOT + 75 tokens + EOT
OPENAI_VOCAB_SIZE = 49408  # 256 bytes + 256 byte</w> + 48,894 merges + SOT + EOT


@runtime_checkable
class Tokenizer(Protocol):
    """Texts -> a [N, context_length] LongTensor of ids, zero-padded; a text too long is refused unless truncated."""

    kind: str  # the name an ONNX export records

    @property
    def context_length(self) -> int:
        """Default row length."""

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the text tower's embedding rows)."""

    @property
    def eot_token_id(self) -> int:
        """The id that ends every row's text."""

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        """Token ids; `truncate=False` raises TextTooLong for a text longer than the row."""

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer's files into a model directory (read back by the class's `from_directory`)."""

    def save_portable(self, directory: str | Path) -> dict[str, str]:
        """Make sure a plain HF `tokenizers` JSON file is in `directory`; {"file": its name, "file_note": caveats}."""


def copy_into(source: Path, directory: str | Path, name: str) -> Path:
    """Copy a tokenizer's file into a model directory under `name` (nothing to do when it is already there)."""
    target = Path(directory) / name
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return Path(directory)


CLEAN_FILE = "clipforge_text_clean.json"  # a clipforge folder's record of open_clip's text cleaning


def open_clip_clean(directory: Path | None) -> str:
    """The text cleaning open_clip applies before a folder's HF tokenizer ("canonicalize", or "" for none): its
    open_clip_config.json's text_cfg.tokenizer_kwargs.clean, or what a clipforge save recorded."""
    import json

    if directory is None:
        return ""
    for name in ("open_clip_config.json", CLEAN_FILE):
        try:
            data = json.loads((Path(directory) / name).read_text())
        except (OSError, ValueError):
            continue
        if name == CLEAN_FILE:
            return str(data.get("clean", ""))
        text_cfg = (data.get("model_cfg", data) or {}).get("text_cfg") or {}
        return str((text_cfg.get("tokenizer_kwargs") or {}).get("clean", ""))
    return ""


def record_clean(directory: str | Path, clean: str) -> None:
    """Keep open_clip's text cleaning with a tokenizer saved into a clipforge folder."""
    import json

    if clean:
        (Path(directory) / CLEAN_FILE).write_text(json.dumps({"clean": clean}) + "\n")
