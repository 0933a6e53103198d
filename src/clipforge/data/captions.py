"""Caption CSV/TSV dataset (map-style), plus the per-sample decoding and skip rules shared with shards."""
from __future__ import annotations

import csv
import dataclasses
import inspect
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union

import torch
from torch.utils.data import Dataset

from clipforge.data.images import DEFAULT_MAX_PIXELS, IMAGE_ERROR_REASONS, SampleError, decode_image
from clipforge.errors import DataError, TextTooLong
from clipforge.text.base import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]

SKIP_REASONS = IMAGE_ERROR_REASONS + ("empty_caption", "bad_encoding", "bad_shard")
# Lone surrogates are what errors="surrogateescape" leaves for bytes that are not UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


class Skipped(NamedTuple):
    """Marker a dataset returns in place of a bad sample; the collate function counts and drops it."""

    reason: str
    index: int
    detail: str = ""
    path: str = ""  # the file (or shard:key) the skip log names


def sample_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """Per-sample RNG from (seed, epoch, index): the same in any worker, process or resumed run."""
    # A str seed is hashed with SHA-512 by random.Random, so it is stable across processes,
    # unlike hash() of a str under hash randomisation.
    return random.Random(f"clipforge:{seed}:{epoch}:{index}")


def caption_problem(text: str | None) -> str | None:
    """The skip reason for one caption ("bad_encoding", "empty_caption"), or None if it is usable."""
    if text is None or not text.strip():
        return "empty_caption"
    if _SURROGATE.search(text):
        return "bad_encoding"
    return None


def split_captions(cell: str | None, separator: str | None) -> list[str]:
    """The captions held by one cell, stripped (not yet checked)."""
    if cell is None:
        return [""]
    return [c.strip() for c in (cell.split(separator) if separator else [cell])]


def sort_captions(texts: Sequence[str | None], dropped: Counter | None = None) -> tuple[list[str], str | None, str]:
    """(usable captions, reason if none is usable, detail); bad ones beside usable ones go to `dropped`."""
    good, problems = [], []
    for text in texts:
        problem = caption_problem(text)
        if problem is None:
            good.append(text)
        else:
            problems.append((problem, text))
    if good:
        if dropped is not None:
            dropped.update(p for p, _ in problems)
        return good, None, ""
    reason, text = problems[0] if problems else ("empty_caption", "")
    return [], reason, repr((text or "")[:60])


def with_composite_white(transform: Callable, composite_white: bool | None) -> Callable:
    """A copy of a dataclass transform with `composite_white` set (None: leave it as it is)."""
    if composite_white is None:
        return transform
    if not (dataclasses.is_dataclass(transform) and hasattr(transform, "composite_white")):
        raise DataError(f"composite_white given but {type(transform).__name__} has no such option")
    return dataclasses.replace(transform, composite_white=composite_white)


def takes_rng(transform: Callable) -> bool:
    """Whether the transform accepts an `rng` keyword (TrainTransform does, EvalTransform does not)."""
    try:
        return "rng" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


class TruncatingTokenizer:
    """Training's tokenizer: a caption longer than the context is cut (as `truncate=True`), and the cuts counted."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap a `Tokenizer` (its context length and EOT id tell a cut row)."""
        self.tokenizer = tokenizer

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token rows, over-long texts cut."""
        return self.tokenizer(texts, truncate=True)

    def counted(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Token rows, over-long texts cut, and how many were cut."""
        try:
            return self.tokenizer(texts), 0  # nothing too long: the same rows as with truncate=True
        except TextTooLong:
            context = self.tokenizer.context_length
            # One slot more: the rows of texts too long for the context end with EOT in that last slot.
            wider = self.tokenizer(texts, context_length=context + 1, truncate=True)
            cut = int((wider[:, context] == self.tokenizer.eot_token_id).sum())
            return self.tokenizer(texts, truncate=True), cut


def tokenize_counted(tokenizer: Callable, texts: Sequence[str],
                     rng: random.Random | None = None) -> tuple[torch.Tensor, int]:
    """Token rows and how many texts were cut to fit (only a `TruncatingTokenizer` counts its cuts). A pair
    column of another modality (`takes_rng`: e.g. audio files, `data.audio.AudioColumn`) gets the sample's draws."""
    if isinstance(tokenizer, TruncatingTokenizer):
        return tokenizer.counted(texts)
    if getattr(tokenizer, "takes_rng", False):
        return tokenizer(texts, rng=rng), 0
    return tokenizer(texts), 0


def make_sample(
    image: PathLike | bytes, captions: Sequence[str], rng: random.Random, transform: Callable,
    tokenizer: Tokenizer, *, index: int, key: str | None, max_pixels: int, pass_rng: bool, name: str = "",
) -> dict[str, Any]:
    """Pick a caption, decode and transform the image, tokenise: the sample dict (or SampleError).

    "caption_truncated" is 1 when the caption was cut to the context (a `TruncatingTokenizer`), else 0."""
    # The caption is drawn first so that the crop's draws do not depend on how many captions exist.
    caption = captions[rng.randrange(len(captions))]
    decoded = decode_image(image, max_pixels, name)
    pixels = transform(decoded, rng=rng) if pass_rng else transform(decoded)
    tokens, cut = tokenize_counted(tokenizer, [caption], rng)
    return {"pixels": pixels, "tokens": tokens[0], "key": key, "index": index, "caption": caption,
            "caption_truncated": cut}


def _delimiter_for(path: Path, delimiter: str | None) -> str:
    if delimiter is not None:
        return delimiter
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    raise DataError(f"{path}: cannot tell the delimiter from suffix {suffix!r}; pass delimiter=")


class CaptionDataset(Dataset):
    """Image-caption pairs from a CSV/TSV file; rows sharing an image become one multi-caption sample.

    Image paths are relative to the file's folder. Items are sample dicts or `Skipped` markers;
    an item may be indexed by `index` (uses `self.epoch`) or by `(epoch, index)`, which is how
    the training loader passes the epoch to worker processes that hold their own copy.
    """

    def __init__(
        self, path: PathLike, transform: Callable, tokenizer: Tokenizer, *, image_column: str = "image",
        caption_column: str = "caption", key_column: str | None = None, delimiter: str | None = None,
        caption_separator: str | None = None, quoting: bool = True, seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS, composite_white: bool | None = None,
    ) -> None:
        """Read and group the table; raise ValueError naming the file for start-up problems."""
        self.path = Path(path)
        self.transform = with_composite_white(transform, composite_white)
        self.tokenizer = tokenizer
        self.seed, self.epoch, self.max_pixels = seed, 0, max_pixels
        self._pass_rng = takes_rng(self.transform)
        self.dropped_captions: Counter = Counter()  # bad captions of images that have good ones too
        delimiter = _delimiter_for(self.path, delimiter)
        # quoting=False reads quotes as plain text: raw TSV dumps (CC3M) have captions that open with one.
        mode = csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE
        self._read(self.path, image_column, caption_column, key_column, delimiter, mode, caption_separator)

    def _read(
        self, path: Path, image_col: str, caption_col: str, key_col: str | None, delimiter: str, quoting: int,
        separator: str | None,
    ) -> None:
        if not path.is_file():
            raise DataError(f"caption file not found: {path}")
        # utf-8-sig drops a spreadsheet's BOM; surrogateescape keeps bad bytes to flag per caption.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (no header row)")
            wanted = [image_col, caption_col] + ([key_col] if key_col else [])
            missing = [c for c in wanted if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; columns found: {header}")
            at = {c: header.index(c) for c in wanted}
            groups: dict[str, int] = {}
            paths: list[str] = []
            texts: list[list[str]] = []
            keys: list[str | None] = []
            folder = path.parent
            for row in reader:
                if not row:
                    continue
                row += [""] * (len(header) - len(row))  # short rows: missing cells read as empty
                image = os.path.normpath(folder / row[at[image_col]])
                slot = groups.setdefault(image, len(paths))
                if slot == len(paths):
                    paths.append(image)
                    texts.append([])
                    keys.append(row[at[key_col]].strip() or None if key_col else None)
                texts[slot].extend(split_captions(row[at[caption_col]], separator))
        if not paths:
            raise DataError(f"{path}: no data rows (empty dataset)")
        self.paths = paths
        self.keys: list[str | None] | None = keys if key_col else None
        self.captions: list[list[str]] = []
        self._bad: dict[int, tuple[str, str]] = {}  # images with no usable caption, skipped on access
        for index, group in enumerate(texts):
            good, reason, detail = sort_captions(group, self.dropped_captions)
            self.captions.append(good)
            if reason:
                self._bad[index] = (reason, detail)

    def __len__(self) -> int:
        """Number of distinct images."""
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by plain integer indexing (the loader passes (epoch, index) instead)."""
        self.epoch = epoch

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | Skipped:
        """Sample dict {"pixels", "tokens", "key", "index", "caption"} or a Skipped marker."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} samples")
        if index in self._bad:
            return Skipped(self._bad[index][0], index, f"{self.paths[index]}: caption {self._bad[index][1]}",
                           str(self.paths[index]))
        try:
            return self._make(index, sample_rng(self.seed, epoch, index))
        except SampleError as error:
            return Skipped(error.reason, index, error.detail, str(self.paths[index]))

    def _make(self, index: int, rng: random.Random) -> dict[str, Any]:
        return make_sample(self.paths[index], self.captions[index], rng, self.transform, self.tokenizer, index=index,
                           key=self.keys[index] if self.keys else None, max_pixels=self.max_pixels,
                           pass_rng=self._pass_rng)
