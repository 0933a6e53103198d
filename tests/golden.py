"""Reference fixtures for the golden tests: the in-repo cut (always) and the shared set (when present).

A reference model folder, in either source, has the shared layout (../shared/fixtures/README.md):
`openai_state_dict.safetensors` (and maybe `openai_state_dict.pt`), `image0..3.png`, `meta.json` and
`expected.safetensors` (the reference implementation's `pixels`, `tokens`, `image_features`,
`text_features`, `logit_scale`). The in-repo cut (tests/fixtures/golden/, made by
scripts/make_golden_fixture.py) stores the weights with only the token-embedding rows the reference
tokens use; `materialise` rebuilds the folder from it, the other rows filled with a fixed seeded filler.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "fixtures" / "golden"
SHARED_ENV = "CLIPFORGE_SHARED_FIXTURES"  # a folder, or "none" to leave the shared fixtures out
DEFAULT_SHARED = TESTS.parent.parent / "shared" / "fixtures"
WEIGHT_FILES = ("openai_state_dict.safetensors", "openai_state_dict.pt")
COMPACT = "openai_state_dict.compact.safetensors"
FILLER_SEED = 0


def shared_root() -> Path | None:
    """The shared fixtures folder, or None when absent or switched off (CLIPFORGE_SHARED_FIXTURES=none).

    CLIPFORGE_FIXTURES, the variable's older name, is honoured too.
    """
    value = os.environ.get(SHARED_ENV, os.environ.get("CLIPFORGE_FIXTURES"))
    if value is not None and value.strip().lower() in ("", "0", "no", "none", "off", "false"):
        return None
    root = Path(value).expanduser() if value else DEFAULT_SHARED
    return root if root.is_dir() else None


def model_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "expected.safetensors").is_file())


def golden_names() -> list[str]:
    return sorted(p.parent.name for p in GOLDEN.glob(f"*/{COMPACT}"))


def rebuild_state_dict(compact: Path) -> dict[str, torch.Tensor]:
    """The OpenAI-layout state dict: the stored tensors, and the full token embedding with the stored rows."""
    state = load_file(str(compact))
    with safe_open(str(compact), "pt") as handle:
        about = json.loads(handle.metadata()["clipforge_golden"])
    ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
    vocab, width = about["token_embedding_shape"]
    gen = torch.Generator().manual_seed(FILLER_SEED)
    embedding = 0.02 * torch.randn(vocab, width, generator=gen, dtype=rows.dtype)  # rows no output reads
    embedding[ids] = rows
    state["token_embedding.weight"] = embedding
    return state


def materialise(name: str, out: Path) -> Path:
    """Write the in-repo model `name` as a folder in the shared layout under `out`; return it."""
    src, dst = GOLDEN / name, out / name
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.name != COMPACT:
            shutil.copyfile(path, dst / path.name)
    state = rebuild_state_dict(src / COMPACT)
    save_file(state, str(dst / WEIGHT_FILES[0]))
    torch.save(state, dst / WEIGHT_FILES[1])  # the same tensors as a plain pickle, as shared RN-tiny has
    return dst


@dataclass(frozen=True)
class Reference:
    """One reference model folder: `source` is "repo" (the in-repo cut) or "shared"."""

    source: str
    name: str
    folder: Path

    @property
    def id(self) -> str:
        return f"{self.source}-{self.name}"

    @property
    def checkpoint(self) -> Path:
        return self.folder / WEIGHT_FILES[0]

    @property
    def weight_files(self) -> list[Path]:
        return [self.folder / f for f in WEIGHT_FILES if (self.folder / f).is_file()]

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))

    @property
    def images(self) -> list[Path]:
        return [self.folder / image for image in self.meta["images"]]

    @property
    def captions(self) -> list[str]:
        return self.meta["captions"]

    @property
    def image_size(self) -> int:
        return self.meta["vision_cfg"]["image_size"]

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.meta["vision_cfg"]["layers"], list)

    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / "expected.safetensors"))
