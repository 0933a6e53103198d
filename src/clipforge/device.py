"""`--device` for every command that runs a model: "cpu", "cuda", "cuda:N", "mps" or "auto"."""
from __future__ import annotations

import torch

from clipforge.errors import ConfigError

DEVICE_HELP = 'where the model runs: cpu, cuda, cuda:N, mps or auto (the first GPU if one is visible, else cpu)'


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device for `spec`; a GPU that is not there is refused, naming what torch can see."""
    if isinstance(spec, torch.device):
        return spec
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # torchrun sets each rank's
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device {spec!r}: no CUDA GPU is visible (torch {torch.__version__}, {build})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {spec!r}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r}: MPS (Apple GPU) is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {spec!r}: use cpu, cuda, cuda:N, mps or auto")
    return device
