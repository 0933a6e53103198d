"""The one image decode policy of clipforge: training, evaluation, indexing, serving and the demo all open
images here, so a file is accepted, converted or refused the same way everywhere.

- Decompression bombs are refused from the header, before any pixel is decoded ("too_many_pixels").
- High bit depth is scaled to 8 bits, never clipped: Pillow's own `convert("L"/"RGB")` clips 16-bit and
  float pixels to 0..255, which turns a 16-bit photo near-white (measured: mean 254.4 of 255).
- Transparency: `to_rgb(image, composite_white)` is the only place that makes RGB. OpenAI's transform
  drops alpha (`convert("RGB")`, transparent pixels keep their colour channels); transformers'
  `CLIPImageProcessor` composites on white. Which one applies is the checkpoint's (see `PreprocessConfig`).
"""
from __future__ import annotations

import io
import json
import os
import stat
import struct
import warnings
import zlib
from pathlib import Path
from typing import IO, Any, Iterable, NamedTuple, Union

import numpy as np
from PIL import Image

from clipforge.errors import DataError, SampleError
from clipforge.io import write_atomic

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MAX_PIXELS = 64_000_000
# File types read as images everywhere (folders, CSVs, webdataset members); TIFF carries 16-bit and float.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_SUFFIXES = frozenset(f".{e}" for e in IMAGE_EXTENSIONS)
IMAGE_ERROR_REASONS = ("missing_file", "empty_file", "corrupt_image", "too_many_pixels", "unsupported_mode")
# Modes Pillow maps onto 8-bit RGB faithfully with convert().
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Modes whose samples are wider than 8 bits: scaled by `to_8bit`.
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})
# What Pillow's decoders raise on malformed input (plugins are not consistent about it).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)
_UINT16_MAX = 65535


SKIP_LOG = "skipped.jsonl"  # beside what a job wrote (an index, an eval report, a training run)


class SkippedFile(NamedTuple):
    """A file a job left out, and why (a reason of IMAGE_ERROR_REASONS, or the data source's own)."""

    path: str
    reason: str


def skipped_by_reason(skipped: Iterable[SkippedFile]) -> dict[str, list[str]]:
    """Reason -> the sorted paths skipped for it, reasons in alphabetical order (what `--json` outputs name)."""
    files: dict[str, set[str]] = {}
    for skip in skipped:
        files.setdefault(skip.reason, set()).add(skip.path)
    return {reason: sorted(files[reason]) for reason in sorted(files)}


def write_skip_log(folder: str | Path, skipped: Iterable[SkippedFile]) -> Path:
    """Atomically write FOLDER/skipped.jsonl: one {"path", "reason"} a line, in path order (empty: none)."""
    path = Path(folder) / SKIP_LOG
    write_atomic(path, "".join(json.dumps(skip._asdict()) + "\n" for skip in sorted(set(skipped))))
    return path


def _scale_to_uint8(values: np.ndarray, top: float) -> np.ndarray:
    return np.rint(values.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8)


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return _scale_to_uint8(values.astype(np.float64) - low, high - low)


def to_8bit(image: Image.Image) -> Image.Image:
    """The image in an 8-bit mode: 16-bit and 32-bit integer and float greyscale scaled, 8-bit modes untouched.

    Rules (documented in the README): `I;16*` maps 0..65535 onto 0..255; `I` (32-bit int) does the
    same when its values lie in 0..65535 (Pillow opens some 16-bit files as `I`), else it is stretched
    from its min to its max; `F` maps 0..1 onto 0..255 when its values lie there, else it is
    stretched; NaN and infinities count as 0.
    """
    mode = image.mode
    if mode in EIGHT_BIT_MODES:
        return image
    if mode not in HIGH_DEPTH_MODES:
        raise SampleError("unsupported_mode", f"mode {mode} (clipforge reads 8-bit modes, I;16, I and F)")
    values = np.asarray(image)
    if mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        in_unit = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
        pixels = _scale_to_uint8(values, 1.0) if in_unit else _stretch_to_uint8(values)
    elif mode.startswith("I;16") or (values.size == 0 or (values.min() >= 0 and values.max() <= _UINT16_MAX)):
        pixels = _scale_to_uint8(values, _UINT16_MAX)
    else:
        pixels = _stretch_to_uint8(values)
    converted = Image.fromarray(pixels, mode="L")
    converted.info = {k: v for k, v in image.info.items() if k != "transparency"}
    return converted


def composite_on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency blended onto white, as transformers' `convert_rgb` does."""
    image = to_8bit(image)
    has_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, composite_white: bool = False) -> Image.Image:
    """8-bit RGB: alpha blended on white (transformers) or dropped (OpenAI's `convert("RGB")`)."""
    image = to_8bit(image)
    return composite_on_white(image) if composite_white else image.convert("RGB")


def _open_source(source: PathLike | bytes | IO[bytes], name: str) -> tuple[Any, str]:
    if hasattr(source, "read"):  # an open file or BytesIO (webdataset members, uploads)
        return source, name or "<stream>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise SampleError("empty_file", name or "<bytes>")
        return io.BytesIO(source), name or "<bytes>"
    path = os.fspath(source)
    try:
        info = os.stat(path)
    except OSError as error:
        raise SampleError("missing_file", f"{path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SampleError("missing_file", f"{path}: not a regular file")
    if info.st_size == 0:
        raise SampleError("empty_file", path)
    return path, path


def decode_image(
    source: PathLike | bytes | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS, name: str = ""
) -> Image.Image:
    """Open and fully decode an image (path or bytes) into an 8-bit mode, or raise SampleError with the reason."""
    fp, name = _open_source(source, name)
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning would let a bomb through.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as image:
                # The header gives the size, so bombs are refused before any pixel is decoded.
                if image.width * image.height > max_pixels:
                    raise SampleError("too_many_pixels", f"{name}: {image.width}x{image.height} > {max_pixels}")
                if image.mode not in EIGHT_BIT_MODES | HIGH_DEPTH_MODES:
                    raise SampleError("unsupported_mode", f"{name}: mode {image.mode}")
                image.load()
                return to_8bit(image)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise SampleError("too_many_pixels", f"{name}: {error}") from None
        except FileNotFoundError:
            raise SampleError("missing_file", name) from None
        except SampleError:
            raise
        except _DECODE_ERRORS as error:
            raise SampleError("corrupt_image", f"{name}: {type(error).__name__}: {error}") from None


def load_image(image: Image.Image | str | Path | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A decoded 8-bit image from a path, or a PIL image brought to 8 bits; FileNotFoundError / ValueError."""
    if isinstance(image, Image.Image):
        return to_8bit(image)
    try:
        return decode_image(image, max_pixels)
    except SampleError as error:
        if error.reason == "missing_file":
            raise FileNotFoundError(f"image not found: {error.detail}") from None
        raise DataError(f"cannot read image {image}: {error}") from error  # the cause keeps the policy's reason
