"""The evaluation tasks behind `clipforge eval`: each returns results and report sections."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from clipforge.data.labelled import (
    LabelledImages,
    SkippedFile,
    decode_all,
    load_captioned_images,
    load_labelled_images,
    skip_counts,
)
from clipforge.errors import EvaluationError
from clipforge.evaluate.report import Section, plot_bars, plot_confusion, plot_robustness
from clipforge.evaluate.retrieval import retrieval_recall
from clipforge.inference.features import extract_image_features, extract_text_features, labelled_image_features
from clipforge.inference.metrics import confusion_matrix
from clipforge.inference.templates import get_templates, list_templates
from clipforge.inference.zeroshot import build_classifier, evaluate_zero_shot, zero_shot_predict


@dataclass
class EvalContext:
    """What every task needs: the model, its tokenizer and preprocessing, where to write plots."""

    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable
    out_dir: Path
    templates: str = "openai_7"
    batch_size: int = 128
    sections: list[Section] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)  # every image a task left out, once: the skip log
    precision: str = "fp32"  # feature extraction: "fp32" or "bf16" autocast (resolved: clipforge.precision)

    def note_skipped(self, skipped: Iterable[SkippedFile]) -> None:
        """Add the images a task left out (a file two tasks skipped is listed once)."""
        known = set(self.skipped)  # extended in place: a task's copy of the context (dataclasses.replace) shares it
        self.skipped.extend(s for s in dict.fromkeys(skipped) if s not in known)


def skip_text(skipped: Iterable[SkippedFile]) -> str:
    """Skipped images by reason as words: "corrupt_image 1, missing_file 2", or "none"."""
    return ", ".join(f"{reason} {count}" for reason, count in skip_counts(skipped).items()) or "none"


def prompt_modes(templates: str) -> dict[str, list[str]]:
    """The prompt ablation: bare label, the set's first template, the whole ensemble."""
    names = get_templates(templates)
    return {"label": ["{}"], "template": names[:1], "ensemble": names}


def zeroshot(ctx: EvalContext, data: LabelledImages, name: str = "zero-shot", confusion: bool = False,
             features: torch.Tensor | None = None, templates: str | None = None) -> dict[str, Any]:
    """Top-1/top-5/mean per-class recall under label, single template and ensemble prompts."""
    if templates and templates != ctx.templates:
        return zeroshot(replace(ctx, templates=templates), data, name, confusion, features)
    if features is None:
        features, data = labelled_image_features(ctx.model, data, ctx.preprocess, ctx.batch_size, ctx.precision)
    ctx.note_skipped(data.skipped)
    results: dict[str, Any] = {"images": len(data.paths), "classes": len(data.classnames),
                               "skipped": skip_counts(data.skipped)}
    rows = []
    for mode, templates in prompt_modes(ctx.templates).items():
        classifier = build_classifier(ctx.model, ctx.tokenizer, data.classnames, templates, precision=ctx.precision)
        metrics = evaluate_zero_shot(ctx.model, features, data.labels, classifier)
        results[mode] = metrics
        rows.append({"prompts": mode, "templates": len(templates), **metrics})
    text = (f"{len(data.paths)} images, {len(data.classnames)} classes (chance {1 / len(data.classnames):.4f}); "
            f"template set `{ctx.templates}`; skipped: {skip_text(data.skipped)}.")
    images = [plot_bars({name: {r["prompts"]: r["top1"] for r in rows}},
                        ctx.out_dir / f"{_slug(name)}-ablation.png", f"{name}: prompt ablation", "top-1")]
    if confusion:
        ensemble = prompt_modes(ctx.templates)["ensemble"]
        classifier = build_classifier(ctx.model, ctx.tokenizer, data.classnames, ensemble, precision=ctx.precision)
        preds = zero_shot_predict(ctx.model, features, classifier).argmax(-1)
        matrix = confusion_matrix(preds, data.labels, len(data.classnames))
        results["confusion_matrix"] = matrix.tolist()
        images.append(plot_confusion(matrix, data.classnames, ctx.out_dir / f"{_slug(name)}-confusion.png"))
    if getattr(ctx.model, "text_decoder", None) is not None:  # CoCa: also by the decoder's caption likelihood
        from clipforge.evaluate.captioning import likelihood_zeroshot

        results["caption_likelihood"] = likelihood_zeroshot(ctx, data, prompt_modes(ctx.templates)["template"][0])
        text += (f" Caption likelihood (CoCa's decoder, template `{results['caption_likelihood']['template']}`): "
                 f"top-1 {results['caption_likelihood']['top1']:.4f}.")
    columns = ["prompts", "templates", "top1", "top5", "mean_per_class_recall"]
    ctx.sections.append(Section(name, text, rows, columns, images))
    return results


def decode_captioned(ctx: EvalContext, data: str | Path, domains: Sequence[str] | None = None,
                     split: str | None = None) -> tuple[Any, torch.Tensor, list[bool], list[SkippedFile]]:
    """A caption table's images decoded with the model's preprocessing: (the table, pixels, which rows decoded,
    the unreadable ones, which also go to the skip log)."""
    captioned = load_captioned_images(data, domains=domains, split=split)
    skipped: list[SkippedFile] = []
    pixels, keep = decode_all(captioned.paths, ctx.preprocess, skipped)
    ctx.note_skipped(skipped)
    if not len(pixels):
        raise EvaluationError(f"{data}: none of the images could be read")
    return captioned, pixels, keep, skipped


def retrieval(ctx: EvalContext, data: str | Path, domains: Sequence[str] | None = None, split: str | None = None,
              name: str = "retrieval") -> dict[str, Any]:
    """Image<->text recall@1/5/10 with every caption of every image."""
    captioned, pixels, keep, skipped = decode_captioned(ctx, data, domains, split)
    new_index = torch.cumsum(torch.tensor(keep, dtype=torch.long), 0) - 1
    caption_keep = torch.tensor(keep)[captioned.caption_to_image]
    captions = [c for c, k in zip(captioned.captions, caption_keep.tolist()) if k]
    owners = new_index[captioned.caption_to_image[caption_keep]]
    images = extract_image_features(ctx.model, pixels, batch_size=ctx.batch_size, precision=ctx.precision)
    texts = extract_text_features(ctx.model, _truncating(ctx.tokenizer), captions, batch_size=256,
                                  precision=ctx.precision)
    metrics = retrieval_recall(images, texts, owners)
    results = {"images": len(pixels), "captions": len(captions), "skipped": skip_counts(skipped), **metrics}
    rows = [{"direction": d, **{f"R@{k}": metrics[f"{d}_r{k}"] for k in (1, 5, 10)}}
            for d in ("image_to_text", "text_to_image")]
    ctx.sections.append(Section(name, f"{len(pixels)} images, {len(captions)} captions.", rows))
    return results


def linear_probe_vs_zeroshot(ctx: EvalContext, data: LabelledImages, train_domains: Sequence[str] | None = None,
                             name: str = "linear probe") -> dict[str, Any]:
    """Logistic regression on frozen features vs zero-shot on the same test images."""
    from clipforge.evaluate.linear_probe import evaluate_linear_probe, stratified_split

    features, data = labelled_image_features(ctx.model, data, ctx.preprocess, ctx.batch_size, ctx.precision)
    ctx.note_skipped(data.skipped)
    if train_domains:
        unknown = set(train_domains) - set(data.domains)
        if unknown:
            raise EvaluationError(f"training style(s) {sorted(unknown)} not in the data ({sorted(set(data.domains))})")
        train = torch.tensor([d in train_domains for d in data.domains])
        test = ~train
    else:
        train_idx, test_idx = stratified_split(data.labels.numpy(), 0.5, seed=0)
        train = torch.zeros(len(data.labels), dtype=torch.bool)
        train[torch.as_tensor(train_idx)] = True
        test = ~train
    if not train.any() or not test.any():
        raise EvaluationError("linear probe needs both training and test images")
    probe = evaluate_linear_probe(features[train], data.labels[train], features[test], data.labels[test],
                                  num_classes=len(data.classnames))
    classifier = build_classifier(ctx.model, ctx.tokenizer, data.classnames, prompt_modes(ctx.templates)["ensemble"],
                                  precision=ctx.precision)
    zs = evaluate_zero_shot(ctx.model, features[test], data.labels[test], classifier)
    rows = [{"method": "linear probe", "top1": probe["test_top1"],
             "mean_per_class_recall": probe["test_mean_per_class_recall"], "C": probe["best_C"]},
            {"method": "zero-shot (ensemble)", "top1": zs["top1"], "mean_per_class_recall": zs["mean_per_class_recall"],
             "C": ""}]
    ctx.sections.append(Section(name, f"train {int(train.sum())} / test {int(test.sum())} images.", rows))
    return {"linear_probe": probe, "zero_shot": zs, "train_images": int(train.sum()), "test_images": int(test.sum())}


CLIP_ZERO_SHOT, CLIP_LINEAR_PROBE, SUPERVISED = "clip-zero-shot", "clip-linear-probe", "supervised"
METHOD_LABELS = {CLIP_ZERO_SHOT: "CLIP zero-shot", CLIP_LINEAR_PROBE: "CLIP linear probe", SUPERVISED: "supervised"}


@dataclass
class RobustnessSettings:
    """What `robustness` measures: the in-distribution styles, an optional supervised baseline, extra zero-shot sets."""

    id_domains: Sequence[str]
    supervised_steps: int = 0  # 0: no supervised baseline
    extra_zero_shot: dict[str, LabelledImages] = field(default_factory=dict)
    name: str = "robustness"


@dataclass
class RobustnessSplit:
    """Row masks over the evaluated images: the in-distribution styles' rows and those held out of training."""

    in_id: torch.Tensor
    id_test: torch.Tensor

    @property
    def id_train(self) -> torch.Tensor:
        """In-distribution rows a baseline may train on."""
        return self.in_id & ~self.id_test


def in_distribution_rows(data: LabelledImages, id_domains: Sequence[str]) -> torch.Tensor:
    """Mask of the images of an in-distribution style; every named style must be in the data."""
    domains = sorted(set(data.domains))
    missing = set(id_domains) - set(domains)
    if missing:
        raise EvaluationError(f"in-distribution style(s) {sorted(missing)} not in the data ({domains})")
    return torch.tensor([d in id_domains for d in data.domains])


def in_distribution_split(labels: torch.Tensor, in_id: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Held-out in-distribution test rows: one random image per class that has at least two."""
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels[in_id].unique().tolist():
        rows = torch.nonzero(in_id & (labels == c)).flatten()
        if len(rows) >= 2:
            test[rows[torch.randint(len(rows), (1,), generator=gen)]] = True
    if not test.any():
        raise EvaluationError("robustness needs at least two in-distribution images of some class (to hold one out)")
    return test


def clip_predictions(ctx: EvalContext, data: LabelledImages, features: torch.Tensor, split: RobustnessSplit,
                     probe_cs: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Predicted class of every image by zero-shot CLIP (prompt ensemble) and by a linear probe on its features.

    The probe's C comes from the `probe_cs` sweep (default: the paper's 1e-3 .. 1e3) on a validation split of
    the in-distribution training rows; the sweep's final model is refit on all of them with the best C.
    """
    from clipforge.evaluate.linear_probe import DEFAULT_CS, evaluate_linear_probe

    classifier = build_classifier(ctx.model, ctx.tokenizer, data.classnames, prompt_modes(ctx.templates)["ensemble"],
                                  precision=ctx.precision)
    predictions = {CLIP_ZERO_SHOT: zero_shot_predict(ctx.model, features, classifier).argmax(-1)}
    train, test = split.id_train, split.id_test
    probe = evaluate_linear_probe(features[train], data.labels[train], features[test], data.labels[test],
                                  num_classes=len(data.classnames), Cs=probe_cs or DEFAULT_CS,
                                  return_model=True)["model"]
    scores = torch.as_tensor(probe.predict_proba(features.numpy()))
    predictions[CLIP_LINEAR_PROBE] = torch.as_tensor(probe.classes_)[scores.argmax(-1)]
    return predictions


def method_accuracy(pred: torch.Tensor, data: LabelledImages, split: RobustnessSplit,
                    id_domains: Sequence[str]) -> dict[str, Any]:
    """One method's top-1: held-out in-distribution, per style, the shifted styles' mean and its retained share."""
    domains = sorted(set(data.domains))
    correct = (pred == data.labels).float()
    per_domain = {d: correct[torch.tensor([x == d for x in data.domains]) & ~split.id_train].mean().item()
                  for d in domains}  # in-distribution styles: held-out images only
    id_acc = correct[split.id_test].mean().item()
    shifted = [d for d in domains if d not in id_domains]
    ood_acc = sum(per_domain[d] for d in shifted) / max(1, len(shifted))
    return {"in_distribution": id_acc, "shifted_mean": ood_acc, "per_domain": per_domain,
            "retained": ood_acc / id_acc if id_acc else 0.0}


def extra_zero_shot(ctx: EvalContext, sets: dict[str, LabelledImages]) -> dict[str, Any]:
    """Zero-shot results of each extra image set, by its name."""
    # A set named like a template set (e.g. "tuxpaint") is prompted with it.
    return {label: zeroshot(ctx, images, name=f"{label} (zero-shot)",
                            templates=label if label in list_templates() else None)
            for label, images in sets.items()}


def robustness_section(ctx: EvalContext, name: str, results: dict[str, Any], held_out: int, classes: int,
                       labels: dict[str, str]) -> None:
    """The report's robustness table and scatter plot: methods under their display labels."""
    rows, points = [], []
    for method, acc in results["domains"].items():
        label = labels.get(method, method)
        rows.append({"method": label, "in-dist": acc["in_distribution"], "shifted (mean)": acc["shifted_mean"],
                     "retained": acc["retained"], **acc["per_domain"]})
        points += [{"name": label, "domain": d, "id_acc": acc["in_distribution"], "ood_acc": a}
                   for d, a in acc["per_domain"].items() if d not in results["id_domains"]]
    plot = plot_robustness(points, ctx.out_dir / f"{_slug(name)}.png", "shifted vs in-distribution top-1")
    ctx.sections.append(Section(name, f"in-distribution styles: {', '.join(results['id_domains'])} (baselines "
                                f"train on them; {held_out} held-out images measure in-distribution accuracy); "
                                f"{classes} classes.", rows, None, [plot]))


def robustness_results(ctx: EvalContext, data: LabelledImages, split: RobustnessSplit,
                       predictions: dict[str, torch.Tensor], settings: RobustnessSettings,
                       labels: dict[str, str] = METHOD_LABELS) -> dict[str, Any]:
    """Accuracies of every method (by method id), the extra zero-shot sets, and the report section."""
    accuracies = {m: method_accuracy(pred, data, split, settings.id_domains) for m, pred in predictions.items()}
    results: dict[str, Any] = {"domains": accuracies, "id_domains": list(settings.id_domains)}
    results.update(extra_zero_shot(ctx, settings.extra_zero_shot))
    robustness_section(ctx, settings.name, results, int(split.id_test.sum()), len(data.classnames), labels)
    return results


def robustness(ctx: EvalContext, data: LabelledImages, settings: RobustnessSettings) -> dict[str, Any]:
    """Accuracy per style for CLIP zero-shot, a CLIP linear probe and (optionally) a supervised model.

    In-distribution = the styles the baselines train on; one image per class of those styles is held out
    and every method's in-distribution accuracy is measured on them. Every other style is a shift (all its
    images are used). Results are keyed by method id (METHOD_LABELS gives the report's names).
    """
    features, data = labelled_image_features(ctx.model, data, ctx.preprocess, ctx.batch_size, ctx.precision)
    ctx.note_skipped(data.skipped)
    in_id = in_distribution_rows(data, settings.id_domains)
    split = RobustnessSplit(in_id, in_distribution_split(data.labels, in_id))
    predictions = clip_predictions(ctx, data, features, split)
    if settings.supervised_steps:
        supervised = supervised_baseline(ctx, data, split.id_train, settings.supervised_steps)
        predictions[SUPERVISED] = supervised(data.paths).argmax(-1)  # paths were all readable above
    return robustness_results(ctx, data, split, predictions, settings)


def supervised_baseline(ctx: EvalContext, data: LabelledImages, train_rows: torch.Tensor, steps: int,
                        lr: float = 1e-3, batch_size: int = 64) -> Callable[[Sequence[Path]], torch.Tensor]:
    """Train a fresh image tower of the evaluated architecture with cross-entropy on `train_rows` (the
    in-distribution styles: the analogue of the paper's ImageNet-trained ResNet); returns paths -> logits."""
    from clipforge.evaluate.supervised import train_supervised
    from clipforge.model.resnet import ModifiedResNet
    from clipforge.model.transformer import VisionTransformer

    config = ctx.model.config
    torch.manual_seed(0)
    visual = (ModifiedResNet if config.vision.is_resnet else VisionTransformer)(config.vision, config.embed_dim)
    rows = torch.nonzero(train_rows).flatten().tolist()
    pixels, keep = decode_all([data.paths[i] for i in rows], ctx.preprocess)
    labels = data.labels[[i for i, k in zip(rows, keep) if k]]
    classifier = train_supervised(visual, config.embed_dim, (pixels, labels), len(data.classnames), steps=steps,
                                  lr=lr, batch_size=batch_size, precision="bf16")

    @torch.inference_mode()
    def predict(paths: Sequence[Path]) -> torch.Tensor:
        images, _ = decode_all(paths, ctx.preprocess)
        return torch.cat([classifier(images[i : i + 256]).float() for i in range(0, len(images), 256)])

    return predict


def _truncating(tokenizer: Callable) -> Callable:
    """A long prompt is cut, not fatal: one long class name must not stop an evaluation."""
    return lambda texts: tokenizer(texts, truncate=True)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def load_for_eval(data: str | Path, styles: str = "", split: str = "") -> LabelledImages:
    """CLI helper: comma-separated styles and an optional split name."""
    return load_labelled_images(data, [s for s in styles.split(",") if s] or None, split or None)
