"""Evaluation of a bound audio tower, as the ImageBind paper does it: emergent zero-shot (recordings against English
labels through the CLIP's frozen text tower: no (audio, text) pair was ever trained on), audio<->image retrieval,
results per language, beside chance and the bound the hub sets (the CLIP's own zero-shot on the paired pictures:
audio reaches text only through the image space, so it cannot do better there).

An audio table is a CSV/TSV with an `audio` column (paths relative to the table) and a label column; optional
`image` (the paired picture), `language` and `split` columns (`clipforge data tuxpaint --audio` writes all of them).
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.checkpoint.io import bound_preprocess
from clipforge.data.images import SkippedFile
from clipforge.data.labelled import decode_all
from clipforge.errors import EvaluationError, SampleError
from clipforge.evaluate.report import Section
from clipforge.evaluate.retrieval import retrieval_recall
from clipforge.evaluate.tasks import EvalContext, prompt_modes, skip_text
from clipforge.inference.features import extract_bound_features, extract_image_features
from clipforge.inference.zeroshot import build_classifier, evaluate_zero_shot, zero_shot_predict


@dataclass
class AudioTable:
    """The rows of an audio table: absolute audio paths, labels, paired images (or None), languages ("" unknown)."""

    audio: list[str]
    labels: list[str]
    images: list[str | None]
    languages: list[str]

    def subset(self, rows: Sequence[int]) -> "AudioTable":
        """The table's rows `rows`, in that order."""
        return AudioTable(*([column[i] for i in rows] for column in (self.audio, self.labels, self.images,
                                                                     self.languages)))


def read_audio_table(path: str | Path, label_column: str = "label", split: str | None = None,
                     languages: Sequence[str] | None = None) -> AudioTable:
    """An audio table's rows (optionally of one split and some languages); refuses a table without them."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"audio table not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    columns = set(rows[0]) if rows else set()
    missing = {"audio", label_column} - columns
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {sorted(missing)}; columns found: {sorted(columns)}")
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
    if languages:
        rows = [r for r in rows if r.get("language", "") in set(languages)]
    if not rows:
        raise EvaluationError(f"{path}: no rows" + (f" of split {split!r}" if split else "")
                              + (f" in languages {list(languages)}" if languages else ""))
    folder = path.parent
    images = [os.path.normpath(folder / r["image"]) if r.get("image") else None for r in rows]
    return AudioTable([os.path.normpath(folder / r["audio"]) for r in rows], [r[label_column] for r in rows],
                      images, [r.get("language", "") for r in rows])


def decode_recordings(table: AudioTable, preprocess: Callable) -> tuple[torch.Tensor, AudioTable, list[SkippedFile]]:
    """The table's recordings that decode, as a stack of preprocessed clips; those rows; the others, with reasons."""
    clips, kept, skipped = [], [], []
    for row, path in enumerate(table.audio):
        try:
            clips.append(preprocess(path))
            kept.append(row)
        except SampleError as error:
            skipped.append(SkippedFile(path, error.reason))
    if not clips:
        raise EvaluationError(f"none of the {len(table.audio)} recordings could be read ({skip_text(skipped)})")
    return torch.stack(clips), table.subset(kept), skipped


def embed_recordings(ctx: EvalContext, table: AudioTable, modality: str) -> tuple[torch.Tensor, AudioTable]:
    """Normalised embeddings of the table's recordings that decode, and those rows; the rest go to the skip log."""
    clips, table, skipped = decode_recordings(table, bound_preprocess(ctx.model.config, modality))
    ctx.note_skipped(skipped)
    features = extract_bound_features(ctx.model, clips, lambda clip: clip, modality, ctx.batch_size,
                                      precision=ctx.precision)
    return features, table


def audio_zeroshot(ctx: EvalContext, table: AudioTable, modality: str = "audio",
                   name: str = "emergent zero-shot (audio)") -> dict[str, Any]:
    """Top-1/top-5 of recordings against the labels under label, template and ensemble prompts, per language,
    beside chance and the CLIP's own zero-shot on the paired pictures (the hub's bound)."""
    features, table = embed_recordings(ctx, table, modality)
    classnames = sorted(set(table.labels))
    labels = torch.tensor([classnames.index(label) for label in table.labels])
    results: dict[str, Any] = {"recordings": len(table.audio), "classes": len(classnames),
                               "chance": 1 / len(classnames)}
    rows, classifier = [], None
    for mode, templates in prompt_modes(ctx.templates).items():
        classifier = build_classifier(ctx.model, ctx.tokenizer, classnames, templates, precision=ctx.precision)
        results[mode] = evaluate_zero_shot(ctx.model, features, labels, classifier)
        hits = zero_shot_predict(ctx.model, features, classifier).argmax(-1) == labels
        results[mode]["per_language"] = _per_language(hits, table.languages)
        rows.append({"prompts": mode, "templates": len(templates), **{k: v for k, v in results[mode].items()
                                                                        if k != "per_language"}})
    if all(table.images):  # with the ensemble: the prompts that suit pictures
        results["image_zero_shot"] = _paired_image_accuracy(ctx, table, classnames, labels, classifier)
    bound = results.get("image_zero_shot")
    text = (f"{len(table.audio)} recordings, {len(classnames)} classes (chance {results['chance']:.4f}); template "
            f"set `{ctx.templates}`; prompts read by the CLIP's frozen text tower (no audio-text pair trained). "
            + (f"The CLIP's own zero-shot on the paired pictures (the hub's bound): top-1 {bound:.4f}. " if bound
               is not None else "") + f"Skipped: {skip_text(ctx.skipped)}.")
    ctx.sections.append(Section(name, text, rows, ["prompts", "templates", "top1", "top5", "mean_per_class_recall"]))
    languages = {mode: results[mode]["per_language"] for mode in prompt_modes(ctx.templates)}
    if len(languages["label"]) > 1:
        ctx.sections.append(Section(f"{name}: per language", "Top-1 under each prompt mode.",
                                    [{"language": lang, "recordings": found["recordings"],
                                      **{mode: languages[mode][lang]["top1"] for mode in languages}}
                                     for lang, found in languages["label"].items()]))
    return results


def _per_language(hits: torch.Tensor, languages: Sequence[str]) -> dict[str, dict[str, float]]:
    """{language: {"recordings", "top1"}}, languages by count ("" reads "none")."""
    out = {}
    for language, count in Counter(languages).most_common():
        rows = torch.tensor([lang == language for lang in languages])
        out[language or "none"] = {"recordings": count, "top1": hits[rows].double().mean().item()}
    return out


def _paired_image_accuracy(ctx: EvalContext, table: AudioTable, classnames: list[str], labels: torch.Tensor,
                           classifier: torch.Tensor) -> float:
    """The CLIP's zero-shot top-1 on each recording's paired picture (weighted as the recordings are)."""
    pixels, kept = _decoded_images(ctx, table)
    features = extract_image_features(ctx.model, pixels, batch_size=ctx.batch_size, precision=ctx.precision)
    predicted = dict(zip(kept, zero_shot_predict(ctx.model, features, classifier).argmax(-1).tolist()))
    rows = [i for i, image in enumerate(table.images) if image in predicted]
    if not rows:
        raise EvaluationError("none of the paired pictures could be read")
    return sum(predicted[table.images[i]] == int(labels[i]) for i in rows) / len(rows)


def _decoded_images(ctx: EvalContext, table: AudioTable) -> tuple[torch.Tensor, list[str]]:
    """The table's distinct pictures that decode (pixels, their paths); the others go to the skip log."""
    unique, skipped = sorted(set(table.images)), []
    pixels, keep = decode_all(unique, ctx.preprocess, skipped)
    ctx.note_skipped(skipped)
    return pixels, [path for path, ok in zip(unique, keep) if ok]


def audio_retrieval(ctx: EvalContext, table: AudioTable, modality: str = "audio",
                    name: str = "retrieval (audio-image)") -> dict[str, Any]:
    """Audio->image and image->audio recall@1/5/10 (an image is found by any of its recordings)."""
    if not all(table.images):
        raise EvaluationError("audio-image retrieval needs an image column in every row")
    features, table = embed_recordings(ctx, table, modality)
    pixels, kept = _decoded_images(ctx, table)
    owners = torch.tensor([kept.index(image) if image in kept else -1 for image in table.images])
    rows = owners >= 0
    images = extract_image_features(ctx.model, pixels, batch_size=ctx.batch_size, precision=ctx.precision)
    metrics = retrieval_recall(images, features[rows], owners[rows])
    results = {"images": len(kept), "recordings": int(rows.sum()),
               **{key.replace("text", "audio"): value for key, value in metrics.items()}}
    table_rows = [{"direction": d, **{f"R@{k}": results[f"{d}_r{k}"] for k in (1, 5, 10)}}
                  for d in ("image_to_audio", "audio_to_image")]
    ctx.sections.append(Section(name, f"{len(kept)} images, {int(rows.sum())} recordings.", table_rows))
    return results
