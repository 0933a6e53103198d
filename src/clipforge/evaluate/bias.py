"""Gender bias probe: zero-shot choice among the man / woman / person variants of one emoji concept.

Every image is classified only among its own group's captions (e.g. "man: red hair", "woman: red hair",
"person: red hair"), so the probe measures whether the model tells the gendered variants apart and which
way it leans, independently of how well it recognises the concept itself. Ties between top captions
(an untrained or degenerate model can score two captions identically) are split evenly rather than
given to the first caption, which would otherwise read as a preference for whichever gender is listed
first.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.errors import EvaluationError
from clipforge.inference.features import extract_image_features
from clipforge.inference.zeroshot import build_classifier, zero_shot_predict

GENDERS = ("man", "woman", "person")


@dataclass
class GenderGroup:
    """Variants of one base concept: gender -> (hexcode, label); always has 'man' and 'woman'."""

    base: str
    members: dict[str, tuple[str, str]]


def load_gendered_groups(concepts_csv: Path) -> list[GenderGroup]:
    """Base concepts of concepts.csv with at least a 'man' and a 'woman' variant, in file order."""
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    with open(concepts_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"hexcode", "label", "gender", "base_concept"} - set(reader.fieldnames or ())
        if missing:
            raise EvaluationError(f"{concepts_csv} lacks columns {sorted(missing)}")
        for row in reader:
            gender, base = (row["gender"] or "").strip(), (row["base_concept"] or "").strip()
            if gender in GENDERS and base:
                # First row wins: a duplicate variant would otherwise silently replace the caption.
                groups.setdefault(base, {}).setdefault(gender, (row["hexcode"].strip(), row["label"].strip()))
    return [GenderGroup(base, {g: m[g] for g in GENDERS if g in m})
            for base, m in groups.items() if "man" in m and "woman" in m]


def _rate(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if len(values) else None


@dataclass
class _GenderedImages:
    """The probe's images with each one's style index, true gender index and its group's caption columns."""

    paths: list[Path] = field(default_factory=list)
    styles: list[int] = field(default_factory=list)
    genders: list[int] = field(default_factory=list)
    columns: list[list[int]] = field(default_factory=list)  # caption column per gender in GENDERS order, or -1
    groups: set[int] = field(default_factory=set)  # indices of the groups with an image


@dataclass
class _Choices:
    """Per image: its credit per gender (ties split evenly), true gender, man-over-woman preference and chance."""

    credit: torch.Tensor
    own: torch.Tensor
    prefers_man: torch.Tensor
    chance: torch.Tensor


def _gendered_images(root: Path, styles: Sequence[str], groups: list[GenderGroup],
                     column: dict[str, int]) -> _GenderedImages:
    """Every variant image of every group in each style that has it; at least one, or EvaluationError."""
    found = _GenderedImages()
    for s, style in enumerate(styles):
        for index, group in enumerate(groups):
            # -1 where the group has no such variant (e.g. no 'person').
            cols = [column[group.members[g][1]] if g in group.members else -1 for g in GENDERS]
            for gender, (hexcode, _) in group.members.items():
                path = root / "images" / style / f"{hexcode}.png"
                if path.is_file():
                    found.paths.append(path)
                    found.styles.append(s)
                    found.genders.append(GENDERS.index(gender))
                    found.columns.append(cols)
                    found.groups.add(index)
    if not found.paths:
        raise EvaluationError(f"no images of gendered concepts under {root / 'images'} for styles {list(styles)}")
    return found


def _choices(logits: torch.Tensor, images: _GenderedImages) -> _Choices:
    """Each image's choice among its own group's captions only."""
    cols = torch.tensor(images.columns)
    present = cols >= 0
    scores = torch.where(present, logits.gather(1, cols.clamp(min=0)), torch.tensor(-torch.inf, dtype=torch.double))
    top = present & (scores == scores.max(dim=1, keepdim=True).values)
    credit = top.double() / top.sum(dim=1, keepdim=True)  # ties share one prediction evenly
    man, woman = scores[:, 0], scores[:, 1]
    prefers_man = (man > woman).double() + 0.5 * (man == woman).double()
    return _Choices(credit, torch.tensor(images.genders), prefers_man, 1.0 / present.sum(dim=1).double())


def _summary(choices: _Choices, mask: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per true gender: image count, within-group accuracy, share of predictions per gender, man-vs-woman."""
    out = {}
    for g, gender in enumerate(GENDERS):
        rows = mask & (choices.own == g)
        out[gender] = {
            "images": int(rows.sum()),
            "accuracy": _rate(choices.credit[rows, g]),
            "chance": _rate(choices.chance[rows]),
            **{f"as_{other}": _rate(choices.credit[rows, k]) for k, other in enumerate(GENDERS)},
            "prefers_man": _rate(choices.prefers_man[rows]),
        }
    return out


def _headline(by_gender: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    man, woman = by_gender["man"], by_gender["woman"]
    gap = None if man["accuracy"] is None or woman["accuracy"] is None else man["accuracy"] - woman["accuracy"]
    return {"accuracy_gap": gap, "neutral_prefers_man": by_gender["person"]["prefers_man"],
            "woman_as_man": woman["as_man"], "man_as_woman": man["as_woman"]}


def _by_style(choices: _Choices, images: _GenderedImages, styles: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The headline numbers and per-gender summary of each style that has images."""
    style_t = torch.tensor(images.styles)
    by_style = {}
    for s, style in enumerate(styles):
        mask = style_t == s
        if mask.any():
            per_gender = _summary(choices, mask)
            by_style[style] = {"images": int(mask.sum()), **_headline(per_gender), "by_gender": per_gender}
    return by_style


def _table(by_gender: dict[str, dict[str, Any]], by_style: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Report rows: all styles together, then each style, one row per gender with images."""
    columns = ("images", "accuracy", "chance", "as_man", "as_woman", "as_person", "prefers_man")
    return [{"style": scope, "gender": gender, **{c: stats[gender][c] for c in columns}}
            for scope, stats in [("all", by_gender)] + [(s, v["by_gender"]) for s, v in by_style.items()]
            for gender in GENDERS if stats[gender]["images"]]


@torch.inference_mode()
def bias_probe(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], root: Path,
               styles: Sequence[str], preprocess: Callable, template: str = "an emoji of {}.", batch_size: int = 64,
               device: torch.device | str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Within-group zero-shot accuracy and man/woman preferences per gender and style (device None: the model's)."""
    root = Path(root)
    if not (root / "concepts.csv").is_file():
        raise EvaluationError(f"{root}: the bias probe needs the emoji dataset folder (with concepts.csv and images/), "
                         "as written by `clipforge data emoji`")
    groups = load_gendered_groups(root / "concepts.csv")
    labels = list(dict.fromkeys(label for group in groups for _, label in group.members.values()))
    images = _gendered_images(root, styles, groups, {label: i for i, label in enumerate(labels)})
    features = extract_image_features(model, images.paths, preprocess, batch_size=batch_size, device=device,
                                      precision=precision)
    classifier = build_classifier(model, tokenizer, labels, templates=[template], precision=precision)
    choices = _choices(zero_shot_predict(model, features, classifier).cpu().double(), images)
    by_gender = _summary(choices, torch.ones(len(images.paths), dtype=torch.bool))
    by_style = _by_style(choices, images, styles)
    return {
        "groups": len(images.groups),
        "images": len(images.paths),
        "template": template,
        "styles": list(by_style),
        "missing_styles": [s for s in styles if s not in by_style],
        **_headline(by_gender),
        "by_gender": by_gender,
        "by_style": by_style,
        "rows": _table(by_gender, by_style),
    }
