"""Evaluation data: labelled images (a labels CSV or an image folder per class) and caption sets."""
from __future__ import annotations

import csv
import io
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from clipforge.data.images import IMAGE_SUFFIXES, SkippedFile
from clipforge.data.webdataset import Sample, read_caption, read_samples
from clipforge.errors import DataError, SampleError


def skip_counts(skipped: Iterable[SkippedFile]) -> dict[str, int]:
    """Skipped images by reason, reasons in alphabetical order ({} when none)."""
    return dict(sorted(Counter(s.reason for s in skipped).items()))


@dataclass
class LabelledImages:
    """Images with class indices into `classnames`, plus each image's domain (style) and split."""

    paths: list[Path]
    labels: torch.Tensor
    classnames: list[str]
    domains: list[str]
    splits: list[str]
    source: str
    skipped: list[SkippedFile] = field(default_factory=list)  # unreadable images left out, with their reasons

    def subset(self, keep: Sequence[bool], skipped: Sequence[SkippedFile] = ()) -> "LabelledImages":
        """Rows where `keep` is true, with classes re-indexed to those still present; `skipped` joins the skips."""
        rows = [i for i, k in enumerate(keep) if k]
        present = sorted({int(self.labels[i]) for i in rows})
        remap = {old: new for new, old in enumerate(present)}
        return LabelledImages([self.paths[i] for i in rows], torch.tensor([remap[int(self.labels[i])] for i in rows]),
                              [self.classnames[c] for c in present], [self.domains[i] for i in rows],
                              [self.splits[i] for i in rows], self.source, [*self.skipped, *skipped])

    def decode(self, preprocess: Callable) -> tuple[torch.Tensor, "LabelledImages"]:
        """Pixels of the readable images, and these images without the others (named in `skipped`)."""
        skipped: list[SkippedFile] = []
        pixels, keep = decode_all(self.paths, preprocess, skipped)
        return pixels, (self.subset(keep, skipped) if skipped else self)


def _read_labels_csv(path: Path) -> LabelledImages:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: unknown class file format: needs columns image,label "
                             f"(optional class_index, style, split); found {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: no rows")
    order: dict[str, int] = {}
    short = next((i for i, r in enumerate(rows, start=2) if not r.get("image") or not r.get("label")), None)
    if short is not None:
        raise DataError(f"{path}: line {short} has no image or no label")
    for row in sorted(rows, key=lambda r: int(r["class_index"]) if (r.get("class_index") or "").isdigit() else 0):
        order.setdefault(row["label"], len(order))
    root = path.parent
    return LabelledImages([root / r["image"] for r in rows], torch.tensor([order[r["label"]] for r in rows]),
                          list(order), [r.get("style", "") or "" for r in rows],
                          [r.get("split", "") or "" for r in rows], str(path))


def _read_image_folder(root: Path) -> LabelledImages:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels, empty = [], [], []
    for index, folder in enumerate(classes):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            empty.append(folder.name)
        paths += files
        labels += [index] * len(files)
    if empty:
        raise DataError(f"{root}: empty class folder(s) with no images: {', '.join(empty)}")
    names = [c.name.replace("_", " ") for c in classes]
    return LabelledImages(paths, torch.tensor(labels), names, [""] * len(paths), [""] * len(paths), str(root))


def load_labelled_images(data: str | Path, domains: Sequence[str] | None = None,
                         split: str | None = None) -> LabelledImages:
    """A labels CSV (or a dataset root holding labels.csv) or an image folder per class, filtered."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        images = _read_labels_csv(path)
    elif path.is_dir() and (path / "labels.csv").is_file():
        images = _read_labels_csv(path / "labels.csv")
    elif path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        images = _read_image_folder(path)
    elif path.exists():
        raise DataError(f"{path}: unknown class file format: give a labels CSV (image,label[,style,split]), "
                         "a dataset folder holding labels.csv, or a folder with one sub-folder of images per class")
    else:
        raise FileNotFoundError(f"evaluation data not found: {path}")
    if domains:
        unknown = set(domains) - set(images.domains)
        if unknown:
            raise DataError(f"{path}: no images of style(s) {sorted(unknown)}; styles: {sorted(set(images.domains))}")
        images = images.subset([d in domains for d in images.domains])
    if split:
        if split not in images.splits:
            raise DataError(f"{path}: no images in split {split!r}; splits: {sorted(set(images.splits) - {''})}")
        images = images.subset([s == split for s in images.splits])
    if not images.paths:
        raise DataError(f"{path}: no images left after filtering (styles={domains}, split={split})")
    return images


def decode_all(paths: Sequence[Any], preprocess: Callable,
               skipped: list[SkippedFile] | None = None) -> tuple[torch.Tensor, list[bool]]:
    """Pixels of every readable image and which ones were readable; the others are left out (and added to `skipped`)."""
    pixels, keep = [], []
    for path in paths:
        try:
            pixels.append(preprocess(path))
            keep.append(True)
        except (ValueError, FileNotFoundError, OSError) as error:
            keep.append(False)
            if skipped is not None:
                name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "<bytes>")  # a stream
                skipped.append(SkippedFile(str(name), _skip_reason(error)))
    return (torch.stack(pixels) if pixels else torch.empty(0)), keep


def _skip_reason(error: Exception) -> str:
    """Why `preprocess(path)` failed, in the decode policy's words (missing_file, corrupt_image, ...)."""
    cause = error if isinstance(error, SampleError) else error.__cause__  # load_image chains the policy's error
    if isinstance(cause, SampleError):
        return cause.reason
    if isinstance(error, FileNotFoundError):
        return "missing_file"
    return "corrupt_image"  # the file decodes, but the transform refused it


@dataclass
class CaptionedImages:
    """Images (paths, or encoded bytes from shards) with one or more captions each (for retrieval)."""

    paths: list
    captions: list[str]
    caption_to_image: torch.Tensor


def load_captioned_images(path: str | Path, separator: str = "|", domains: Sequence[str] | None = None,
                          split: str | None = None) -> CaptionedImages:
    """A caption CSV (image, caption; several captions split on `separator`), optionally filtered."""
    if ".tar" in str(path):
        return _load_captioned_shards(str(path), separator)
    path = Path(path)
    if path.is_dir():
        path = path / "captions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"caption CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if {"image", "caption"} - set(reader.fieldnames or []):
            raise DataError(f"{path}: needs columns image,caption; found {reader.fieldnames}")
        rows = [r for r in reader
                if (not domains or r.get("style") in domains) and (not split or r.get("split") == split)]
    paths, captions, owner = [], [], []
    for row in rows:
        texts = [t.strip() for t in (row["caption"].split(separator) if separator else [row["caption"]]) if t.strip()]
        if not texts:
            continue
        paths.append(path.parent / row["image"])
        captions += texts
        owner += [len(paths) - 1] * len(texts)
    if not paths:
        raise DataError(f"{path}: no captioned images (after filtering styles={domains}, split={split})")
    return CaptionedImages(paths, captions, torch.tensor(owner))


def _shard_captions(tar: tarfile.TarFile, sample: Sample, separator: str) -> list[str]:
    """A sample's captions: a .txt split on `separator`, a .json caption string or list as it is."""
    value = read_caption(tar, sample)
    if isinstance(value, str) and sample.text is not None and separator:
        value = value.split(separator)
    texts = value if isinstance(value, list) else [value]
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def _load_captioned_shards(pattern: str, separator: str) -> CaptionedImages:
    """Images (kept as encoded bytes) and captions from webdataset tar shards: NAME.{jpg,png,webp} + NAME.{txt,json}."""
    from clipforge.data.shards import expand_shards

    images: list = []
    captions: list[str] = []
    owner: list[int] = []
    for shard in expand_shards(pattern):
        try:
            with tarfile.open(shard) as tar:
                for sample in read_samples(tar):
                    texts = _shard_captions(tar, sample, separator)
                    if texts:
                        image = io.BytesIO(tar.extractfile(sample.image).read())
                        image.name = f"{shard}/{sample.image.name}"  # names the member in skip reports
                        images.append(image)
                        captions += texts
                        owner += [len(images) - 1] * len(texts)
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"{shard}: unreadable shard: {error}") from None
    if not images:
        raise DataError(f"{pattern}: no captioned images in the shards")
    return CaptionedImages(images, captions, torch.tensor(owner))
