"""Reading one weight file: safetensors, a torch.save pickle (tensors only, never code) or a TorchScript archive."""
from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from clipforge.checkpoint.openai import read_torchscript
from clipforge.errors import CheckpointError


def read_weights(path: Path) -> dict[str, Any]:
    """Tensors from a .safetensors file, a torch.save pickle (weights_only) or a TorchScript archive."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    if zipfile.is_zipfile(path) and is_torchscript(path):
        return read_torchscript(path)[0]
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not parse; the error says it
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {error}") from None
        # torch's message goes on to suggest weights_only=False, which would run the file's code: not offered.
        raise CheckpointError(f"{path}: not a plain weights file (it refers to {', '.join(unsafe[:3])}); clipforge "
                              "reads tensors only and never runs code from a checkpoint. Save the state dict: "
                              "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')") from None
    except Exception as error:  # torch raises many types for bad pickles; all mean "unreadable"
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(loaded).__name__}")
    return loaded


def _unsafe_globals(path: Path) -> list[str]:
    """Functions and classes a pickle would import (what weights_only refuses); empty if it cannot be listed."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not torch.save's zip format: read the pickle's opcodes instead (never runs it)
        return _pickle_globals(path)


def _pickle_globals(path: Path) -> list[str]:
    """Non-torch globals a plain pickle imports, from its opcodes; empty for a truncated or foreign file."""
    found, strings = [], []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                strings += [arg] if isinstance(arg, str) else []
                if opcode.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
    except Exception:  # pickletools raises ValueError and others on garbage
        return []
    return [name for name in found if not name.startswith(("torch.", "collections."))]


def is_torchscript(path: Path) -> bool:
    """Whether a zip archive is a TorchScript module (its code and constants), not a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
