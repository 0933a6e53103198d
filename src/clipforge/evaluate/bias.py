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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.inference.features import extract_image_features
from clipforge.inference.zeroshot import build_classifier, zero_shot_predict
from clipforge.errors import EvaluationError

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


def _summary(credit: torch.Tensor, own: torch.Tensor, prefers_man: torch.Tensor, chance: torch.Tensor,
             mask: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per true gender: image count, within-group accuracy, share of predictions per gender, man-vs-woman."""
    out = {}
    for g, gender in enumerate(GENDERS):
        rows = mask & (own == g)
        out[gender] = {
            "images": int(rows.sum()),
            "accuracy": _rate(credit[rows, g]),
            "chance": _rate(chance[rows]),
            **{f"as_{other}": _rate(credit[rows, k]) for k, other in enumerate(GENDERS)},
            "prefers_man": _rate(prefers_man[rows]),
        }
    return out


def _headline(by_gender: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    man, woman = by_gender["man"], by_gender["woman"]
    gap = None if man["accuracy"] is None or woman["accuracy"] is None else man["accuracy"] - woman["accuracy"]
    return {"accuracy_gap": gap, "neutral_prefers_man": by_gender["person"]["prefers_man"],
            "woman_as_man": woman["as_man"], "man_as_woman": man["as_woman"]}


@torch.inference_mode()
def bias_probe(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], root: Path,
               styles: Sequence[str], preprocess: Callable, template: str = "an emoji of {}.", batch_size: int = 64,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Within-group zero-shot accuracy and man/woman preferences per gender and style (device None: the model's)."""
    root = Path(root)
    if not (root / "concepts.csv").is_file():
        raise EvaluationError(f"{root}: the bias probe needs the emoji dataset folder (with concepts.csv and images/), "
                         "as written by `clipforge data emoji`")
    groups = load_gendered_groups(root / "concepts.csv")
    labels = list(dict.fromkeys(label for group in groups for _, label in group.members.values()))
    column = {label: i for i, label in enumerate(labels)}
    paths, style_ids, own, member_cols, used_groups = [], [], [], [], set()
    for s, style in enumerate(styles):
        for index, group in enumerate(groups):
            # Caption columns in GENDERS order, -1 where the group has no such variant (e.g. no 'person').
            cols = [column[group.members[g][1]] if g in group.members else -1 for g in GENDERS]
            for gender, (hexcode, _) in group.members.items():
                path = root / "images" / style / f"{hexcode}.png"
                if path.is_file():
                    paths.append(path)
                    style_ids.append(s)
                    own.append(GENDERS.index(gender))
                    member_cols.append(cols)
                    used_groups.add(index)
    if not paths:
        raise EvaluationError(f"no images of gendered concepts under {root / 'images'} for styles {list(styles)}")

    features = extract_image_features(model, paths, preprocess, batch_size=batch_size, device=device)
    classifier = build_classifier(model, tokenizer, labels, templates=[template])
    logits = zero_shot_predict(model, features, classifier).cpu().double()
    cols = torch.tensor(member_cols)
    present = cols >= 0
    scores = torch.where(present, logits.gather(1, cols.clamp(min=0)), torch.tensor(-torch.inf, dtype=torch.double))
    top = present & (scores == scores.max(dim=1, keepdim=True).values)
    credit = top.double() / top.sum(dim=1, keepdim=True)  # ties share one prediction evenly
    man, woman = scores[:, 0], scores[:, 1]
    prefers_man = (man > woman).double() + 0.5 * (man == woman).double()
    chance = 1.0 / present.sum(dim=1).double()
    own_t, style_t = torch.tensor(own), torch.tensor(style_ids)

    everything = torch.ones(len(paths), dtype=torch.bool)
    by_gender = _summary(credit, own_t, prefers_man, chance, everything)
    by_style = {}
    for s, style in enumerate(styles):
        mask = style_t == s
        if mask.any():
            per_gender = _summary(credit, own_t, prefers_man, chance, mask)
            by_style[style] = {"images": int(mask.sum()), **_headline(per_gender), "by_gender": per_gender}

    columns = ("images", "accuracy", "chance", "as_man", "as_woman", "as_person", "prefers_man")
    rows = [{"style": scope, "gender": gender, **{c: stats[gender][c] for c in columns}}
            for scope, stats in [("all", by_gender)] + [(s, v["by_gender"]) for s, v in by_style.items()]
            for gender in GENDERS if stats[gender]["images"]]
    return {
        "groups": len(used_groups),
        "images": len(paths),
        "template": template,
        "styles": list(by_style),
        "missing_styles": [s for s in styles if s not in by_style],
        **_headline(by_gender),
        "by_gender": by_gender,
        "by_style": by_style,
        "rows": rows,
    }
