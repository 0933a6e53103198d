"""`--precision` for every command that runs a model: "fp32", "bf16" or "auto" (the faster one on this machine).

"auto" decides from the library's own capability queries where they settle it: a CUDA GPU's bf16 support,
AMX tiles on a CPU (bf16 about 7x fp32 in matmuls), a CPU without native bf16 (emulated: slower). A CPU with
AVX512-BF16 but no AMX is measured, because the answer differs by vendor: bf16 matmuls ran 2x fp32 on AMD
Zen 5 and 0.65x on an Intel Xeon without AMX. The measurement is cached per machine in
$CLIPFORGE_CACHE/precision.json, so every later run on the machine makes the same choice without timing.
"""
from __future__ import annotations

import functools
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.errors import ConfigError
from clipforge.io import cache_root, write_atomic
from clipforge.timing import call_seconds

PRECISION_CHOICES = ("fp32", "bf16", "auto")
PRECISION_HELP = ("fp32, bf16 (bf16 autocast) or auto: picked per machine, bf16 on a GPU that supports it or a CPU "
                  "with AMX (or where a cached probe measured bf16 faster), else fp32")
# bf16 must beat fp32 by this much in the probe: a near tie is not worth bf16's rounding.
MIN_SPEEDUP = 1.15
# One MLP matmul of a ViT-B layer on a batch of tokens: large enough that oneDNN's bf16 path shows.
PROBE_SHAPE = (256, 768, 3072)
# /proc/cpuinfo flags that decide bf16 speed; they enter the cache key, so a new CPU is measured anew.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
CACHE_FILE = "precision.json"

_MEASURED: dict[str, float] = {}  # this process's probe results by machine key: one answer per process


@dataclass(frozen=True)
class PrecisionChoice:
    """What a precision request resolved to, and why (for logs, metrics.jsonl and reports)."""

    asked: str  # "fp32", "bf16" or "auto"
    precision: str  # "fp32" or "bf16"
    reason: str  # e.g. "AMX tiles", "measured 1.90x fp32 on this CPU, cached probe"
    speedup: float | None = None  # bf16 over fp32 in the probe, when one decided

    def describe(self) -> str:
        """One log line: "precision auto -> bf16 (AMX tiles)"."""
        return f"precision {self.asked} -> {self.precision} ({self.reason})"


def resolve_precision(precision: str, device: torch.device | str) -> PrecisionChoice:
    """The precision to run at on `device`: an explicit one as given (checked), "auto" decided for the machine."""
    device = torch.device(device)
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not _cuda_bf16(device, emulated=True):
            raise ConfigError(f"precision bf16: the GPU {torch.cuda.get_device_name(device)} ({device}) does not "
                              "support bf16; use --precision fp32 (or auto)")
        return PrecisionChoice(precision, precision, "asked")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if _cuda_bf16(device, emulated=False):
            return PrecisionChoice("auto", "bf16", f"{name} supports bf16")
        return PrecisionChoice("auto", "fp32", f"{name} has no native bf16")
    if device.type == "mps":
        return PrecisionChoice("auto", "fp32", "Apple GPU (MPS): bf16 is not chosen automatically")
    return _resolve_cpu()


def _cuda_bf16(device: torch.device, emulated: bool) -> bool:
    """Whether the CUDA GPU `device` runs bf16 (natively, or at all when `emulated`)."""
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=emulated))


def _resolve_cpu() -> PrecisionChoice:
    """auto on the CPU: AMX -> bf16, no native bf16 -> fp32, AVX512-BF16 without AMX -> the cached probe."""
    if torch.cpu._is_amx_tile_supported():
        return PrecisionChoice("auto", "bf16", "AMX tiles")
    if not torch.cpu._is_avx512_bf16_supported():
        return PrecisionChoice("auto", "fp32", "no native bf16 (AVX512-BF16 absent)")
    speedup, cached = cpu_bf16_speedup()
    source = "cached probe" if cached else "probe"
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("auto", "bf16", f"measured {speedup:.2f}x fp32 on this CPU, {source}", speedup)
    return PrecisionChoice("auto", "fp32", f"bf16 measured {speedup:.2f}x fp32 on this CPU, under {MIN_SPEEDUP}x, "
                                           f"{source}", speedup)


def cpu_bf16_speedup() -> tuple[float, bool]:
    """(bf16 matmul speed over fp32 on this CPU, whether it came from the cache): measured once per machine."""
    key = machine_key()
    if key in _MEASURED:
        return _MEASURED[key], True
    path = cache_path()
    entries = _read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and _finite(entry.get("speedup")):
        _MEASURED[key] = float(entry["speedup"])
        return _MEASURED[key], True
    fp32_s, bf16_s = measure_matmul_seconds()
    speedup = fp32_s / bf16_s
    _MEASURED[key] = speedup
    entries[key] = {"speedup": speedup, "fp32_ms": fp32_s * 1e3, "bf16_ms": bf16_s * 1e3, "shape": PROBE_SHAPE,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_atomic(path, json.dumps(entries, indent=1) + "\n")
    except OSError:  # a read-only cache folder costs a probe per process, nothing else
        pass
    return speedup, False


def measure_matmul_seconds(repeats: int = 5) -> tuple[float, float]:
    """(fp32, bf16) seconds of the best of `repeats` PROBE_SHAPE matmuls on the CPU, each after a warm-up."""
    m, k, n = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    # The warm-up call picks (and for bf16 may pack) oneDNN's kernel; the fastest call is the least disturbed.
    fp32, bf16 = (min(call_seconds(functools.partial(torch.mm, a.to(dtype), b.to(dtype)), repeats))
                  for dtype in (torch.float32, torch.bfloat16))
    return fp32, bf16


def machine_key() -> str:
    """What decides the probe's answer: CPU model, its bf16-related flags, torch's thread count and version."""
    model, flags = _cpu_model_and_flags()
    return f"{model} | {' '.join(flags) or '-'} | threads {torch.get_num_threads()} | torch {torch.__version__}"


@functools.lru_cache(maxsize=1)
def _cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and RELEVANT_FLAGS it has, from /proc/cpuinfo where there is one (read once: "auto"
    is resolved per batch by the feature loops)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, ()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            model = value.strip()
        elif name.strip() == "flags":
            flags = set(value.split())
            break  # the first processor's lines describe the CPU
    return model, tuple(flag for flag in RELEVANT_FLAGS if flag in flags)


def cache_path() -> Path:
    """$CLIPFORGE_CACHE/precision.json, default ~/.cache/clipforge/precision.json."""
    return cache_root() / CACHE_FILE


def _read_cache(path: Path) -> dict:
    """The cache's entries by machine key; a missing, unreadable or corrupt file reads as empty (rewritten)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
