"""The demo's measurements: zero-shot by style and split, prompt ablation, robustness, retrieval, bias, photos."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from clipforge.data.labelled import LabelledImages
from clipforge.demo.photos import real_photos
from clipforge.errors import DataError
from clipforge.evaluate.bias import bias_probe
from clipforge.evaluate.report import Section, plot_bars, plot_examples
from clipforge.inference.features import labelled_image_features
from clipforge.inference.templates import get_templates
from clipforge.inference.zeroshot import build_classifier, evaluate_zero_shot, zero_shot_predict


@dataclass
class Evaluated:
    """One trained model with the features of every emoji image (computed once, reused by every table)."""

    name: str
    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable
    images: LabelledImages  # all emoji images (both splits, all styles)
    features: torch.Tensor
    # template -> class name -> its normalised text embedding [D]: each prompt is encoded once, however many
    # styles (each with its own set of concepts) ask for it
    per_template: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot weights [D, classes]; an ensemble is built from its single-template weights.

        normalise(mean of per-template normalised class embeddings) is what OpenAI's ensembling
        computes, so the ablation's single templates and the ensemble share every text forward pass.
        """
        columns = []
        for template in templates:
            known = self.per_template.setdefault(template, {})
            missing = list(dict.fromkeys(name for name in classnames if name not in known))
            if missing:
                weights = build_classifier(self.model, self.tokenizer, missing, [template], cache=False)
                known.update(zip(missing, weights.T))
            columns.append(torch.stack([known[name] for name in classnames], dim=1))
        if len(templates) == 1:
            return columns[0]
        return torch.nn.functional.normalize(torch.stack(columns).mean(0), dim=0)


def embed_all(name: str, model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
              images: LabelledImages) -> Evaluated:
    """Features of every readable emoji image under `model`."""
    features, kept = labelled_image_features(model, images, preprocess, batch_size=256)
    return Evaluated(name, model, tokenizer, preprocess, kept, features)


def _rows(ev: Evaluated, split: str, style: str) -> tuple[LabelledImages, torch.Tensor]:
    """The images of one split x style and their row mask into ev.features."""
    keep = torch.tensor([s == split and d == style for s, d in zip(ev.images.splits, ev.images.domains)])
    if not keep.any():
        raise DataError(f"no {split} images of style {style}")
    return ev.images.subset(keep.tolist()), keep


def accuracy(ev: Evaluated, split: str, style: str, templates: Sequence[str]) -> dict[str, float]:
    """Zero-shot metrics on one split x style, classes = that split's concepts (e.g. 1,282-way for seen)."""
    subset, keep = _rows(ev, split, style)
    classifier = ev.classifier(subset.classnames, templates)
    metrics = evaluate_zero_shot(ev.model, ev.features[keep], subset.labels, classifier)
    return {**metrics, "classes": len(subset.classnames)}


def zero_shot_by_style(models: list[Evaluated], styles: list[str], held_out: list[str], templates: str,
                       sections: list[Section]) -> dict[str, Any]:
    """Top-1/top-5 (prompt ensemble) for each model, split and style; held-out styles marked."""
    ensemble = get_templates(templates)
    results: dict[str, Any] = {}
    rows = []
    for split in ("seen", "unseen"):
        for ev in models:
            row: dict[str, Any] = {"model": ev.name, "concepts": split}
            for style in styles:
                if not any(s == split and d == style for s, d in zip(ev.images.splits, ev.images.domains)):
                    continue  # a style that draws none of this split's concepts (small --limit subsets)
                metrics = accuracy(ev, split, style, ensemble)
                results.setdefault(ev.name, {}).setdefault(split, {})[style] = metrics
                row[style + (" (held out)" if style in held_out else "")] = metrics["top1"]
            rows.append(row)
    n_seen = len(_rows(models[0], "seen", styles[0])[0].classnames)
    n_unseen = len(_rows(models[0], "unseen", styles[0])[0].classnames)
    sections.append(Section(
        "Zero-shot top-1 by style", f"Prompt ensemble `{templates}` ({len(ensemble)} templates). Seen concepts: "
        f"{n_seen}-way (chance {1 / n_seen:.4f}); unseen concepts (never in a training caption): {n_unseen}-way "
        f"(chance {1 / n_unseen:.4f}). Held-out styles were never trained on.", rows))
    return results


def prompt_ablation(models: list[Evaluated], held_out: list[str], templates: str, out_dir: Path,
                    sections: list[Section], validation: str) -> dict[str, Any]:
    """Bare label vs the default template vs the template chosen on a validation style vs the ensemble.

    The single template is chosen on the `validation` style and every number is reported on the other
    held-out styles, so no choice sees the images it is scored on; their mean is the headline.
    """
    ensemble = get_templates(templates)
    present = set(models[0].images.domains)
    reported = [s for s in held_out if s != validation and s in present]
    results: dict[str, Any] = {"validation_style": validation, "default_template": ensemble[0]}
    rows, bars = [], {}
    for ev in models:
        on_validation = {t: accuracy(ev, "seen", validation, [t])["top1"] for t in ensemble}
        chosen = max(on_validation, key=on_validation.get)
        per_style = {}
        for style in reported:
            entry = {"label": accuracy(ev, "seen", style, ["{}"])["top1"],
                     "default template": accuracy(ev, "seen", style, [ensemble[0]])["top1"],
                     "chosen template": accuracy(ev, "seen", style, [chosen])["top1"],
                     "ensemble": accuracy(ev, "seen", style, ensemble)["top1"]}
            per_style[style] = entry
            rows.append({"model": ev.name, "style": style, **entry, "chosen on " + validation: chosen})
            bars[f"{ev.name} {style}"] = entry
        mean = {k: sum(e[k] for e in per_style.values()) / len(per_style) for k in next(iter(per_style.values()))}
        results[ev.name] = {"per_style": per_style, "mean": mean, "chosen_template": chosen,
                            "validation_single_templates": on_validation}
    plot = plot_bars(bars, out_dir / "prompt-ablation.png", "prompts on held-out styles (seen concepts)", "top-1")
    sections.append(Section("Prompt engineering and ensembling",
                            f"Bare label, the default template (`{ensemble[0]}`), the single template chosen on the "
                            f"validation style {validation} (never scored there), and the average of all "
                            f"{len(ensemble)} templates' embeddings, on the other held-out styles.",
                            rows, None, [plot]))
    return results


def logits_for(ev: Evaluated, templates: Sequence[str]) -> Callable[[Sequence[Path]], torch.Tensor]:
    """paths -> zero-shot logits over the seen concepts (reads the cached features by path)."""
    seen = ev.images.subset([s == "seen" for s in ev.images.splits])
    classifier = ev.classifier(seen.classnames, templates)
    row = {p: i for i, p in enumerate(ev.images.paths)}

    def predict(paths: Sequence[Path]) -> torch.Tensor:
        return zero_shot_predict(ev.model, ev.features[[row[p] for p in paths]], classifier)

    return predict


@torch.inference_mode()
def photos_and_examples(models: list[Evaluated], held_out_style: str, templates: str, out_dir: Path,
                        sections: list[Section], examples: int = 8, seed: int = 0) -> dict[str, Any]:
    """Top-3 emoji labels (all concepts) for real photos and for random held-out-style images; two grids."""
    ensemble = get_templates(templates)
    classnames = list(dict.fromkeys(models[0].images.classnames))
    photos = real_photos()
    gen = torch.Generator().manual_seed(seed)
    style_rows = [i for i, d in enumerate(models[0].images.domains) if d == held_out_style]
    picks = [style_rows[i] for i in torch.randperm(len(style_rows), generator=gen)[:examples].tolist()]
    results: dict[str, Any] = {"photos": {}, "examples": {}}
    images = []
    for ev in models:
        classifier = ev.classifier(classnames, ensemble)
        photo_features = ev.model.encode_image(torch.stack([ev.preprocess(p) for p, _ in photos]).to(
            next(ev.model.parameters()).dtype), normalize=True).float() if photos else torch.empty(0)
        for kind, feats, names, titles in (
                ("photos", photo_features, [str(p) for p, _ in photos], [t for _, t in photos]),
                ("examples", ev.features[picks], [str(ev.images.paths[i]) for i in picks],
                 [ev.images.classnames[int(ev.images.labels[i])] for i in picks])):
            if not len(feats):
                continue
            probs = zero_shot_predict(ev.model, feats, classifier).softmax(-1)
            top = probs.topk(3, dim=-1)
            preds = [[(classnames[c], p) for p, c in zip(v.tolist(), i.tolist())]
                     for v, i in zip(top.values, top.indices)]
            results[kind][ev.name] = [{"image": n, "shows": t, "top3": p} for n, t, p in zip(names, titles, preds)]
            paths = [Path(n) for n in names]
            # Photos carry a description, not an emoji label: titled "shows" (green only if a label matches it).
            images.append(plot_examples(paths, titles, preds, out_dir / f"{kind}-{ev.name.lower()}.png", cols=4,
                                        title_prefix="shows" if kind == "photos" else "true"))
    text = (f"Top-3 over all {len(classnames)} emoji labels (prompt ensemble). Photos: {len(photos)} real photos "
            f"shipped in installed wheels (title = what they show, not an emoji label). Examples: {examples} random "
            f"{held_out_style} images (a held-out style).")
    sections.append(Section("Real photos and held-out examples", text, None, None, images))
    return results


def few_shot_vs_zero_shot(ev: Evaluated, target: str, shot_styles: list[str], validation: str, templates: str,
                          sections: list[Section], ks: Sequence[int] = (1, 2, 4), seed: int = 0) -> dict[str, Any]:
    """Linear probes on the model's features from k labelled images per class (other evaluation styles; C chosen on
    the validation style), tested on `target`, against zero-shot there: how many labels zero-shot is worth."""
    from clipforge.evaluate.linear_probe import evaluate_linear_probe

    seen_rows = torch.tensor([s == "seen" for s in ev.images.splits])
    seen = ev.images.subset(seen_rows.tolist())
    features = ev.features[seen_rows]
    by_style = {style: torch.tensor([d == style for d in seen.domains]) for style in {target, validation, *shot_styles}}
    if not all(mask.any() for mask in by_style.values()):
        return {"skipped": "a few-shot style has no seen images in this subset"}
    rng = random.Random(seed)
    pool: dict[int, list[int]] = {}
    for row in torch.nonzero(sum(by_style[s] for s in shot_styles)).flatten().tolist():
        pool.setdefault(int(seen.labels[row]), []).append(row)
    for rows in pool.values():
        rng.shuffle(rows)
    zero_shot = accuracy(ev, "seen", target, get_templates(templates))["top1"]
    results: dict[str, Any] = {"target": target, "shot_styles": shot_styles, "validation_style": validation,
                               "zero_shot": zero_shot, "probes": {}}
    for k in ks:
        train = [r for rows in pool.values() for r in rows[:k]]
        probe = evaluate_linear_probe(features[train], seen.labels[train], features[by_style[target]],
                                      seen.labels[by_style[target]], val_features=features[by_style[validation]],
                                      val_labels=seen.labels[by_style[validation]], Cs=(0.1, 1.0, 10.0, 100.0),
                                      num_classes=len(seen.classnames))
        results["probes"][k] = {"top1": probe["test_top1"], "best_C": probe["best_C"], "images": len(train)}
    results["zero_shot_matches_k"] = _matching_shots(zero_shot, {k: p["top1"] for k, p in results["probes"].items()})
    rows = [{"model": ev.name, "zero-shot": zero_shot, **{f"{k}-shot probe": p["top1"]
                                                         for k, p in results["probes"].items()},
             "zero-shot is worth (labels per class)": results["zero_shot_matches_k"]}]
    sections.append(Section(
        "Zero-shot vs few-shot", f"Logistic-regression probes on {ev.name}'s image features, trained on k labelled "
        f"images per class from {', '.join(shot_styles)} (C chosen on {validation}), tested on {target}; the last "
        "column interpolates (in log k) where the probe would equal zero-shot.", rows))
    return results


def _matching_shots(zero_shot: float, probes: dict[int, float]) -> str:
    """The k (log-interpolated) at which the probes' accuracy equals zero-shot, or a bound."""
    points = sorted(probes.items())
    if zero_shot <= points[0][1]:
        return f"<= {points[0][0]}"
    for (k0, a0), (k1, a1) in zip(points, points[1:]):
        if a0 < zero_shot <= a1:
            t = (zero_shot - a0) / (a1 - a0)
            return f"{2 ** (math.log2(k0) + t * (math.log2(k1) - math.log2(k0))):.1f}"
    return f"> {points[-1][0]}"


def bias_section(model: Any, emoji: Path, sections: list[Section]) -> dict[str, Any]:
    """The gender bias probe on the CLIP model (skipped with a note when the subset has no gendered groups)."""
    try:
        result = bias_probe(model.model, model.tokenizer, emoji, ["google", "twitter"], model.preprocess)
    except ValueError as error:  # e.g. a --limit subset without man/woman variants
        sections.append(Section("Bias probe", f"skipped: {error}"))
        return {"skipped": str(error)}
    rate = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    sections.append(Section("Bias probe", (
        f"{result['groups']} man/woman/person groups, {result['images']} images (google + twitter). Accuracy gap "
        f"(man - woman): {rate(result['accuracy_gap'])}; gender-neutral images preferring the 'man' caption: "
        f"{rate(result['neutral_prefers_man'])}; woman images labelled man: {rate(result['woman_as_man'])}; man images "
        f"labelled woman: {rate(result['man_as_woman'])}."), result.get("rows", [])))
    return {k: v for k, v in result.items() if k != "rows"}
