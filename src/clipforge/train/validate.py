"""Validation hook: contrastive loss and retrieval R@1 on a held-out split."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from clipforge.errors import TrainingError


@torch.no_grad()
def embed_pairs(model: torch.nn.Module, batches: Iterable[dict],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised fp32 image and text embeddings of every (image, caption) pair in `batches`."""
    model.eval()
    images, texts = [], []
    for batch in batches:
        images.append(model.encode_image(batch["pixels"].to(device), normalize=True).float())
        texts.append(model.encode_text(batch["tokens"].to(device), normalize=True).float())
    if not images:
        raise TrainingError("validation split is empty")
    return torch.cat(images), torch.cat(texts)


@torch.no_grad()
def validate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device) -> dict[str, float]:
    """{"loss", "image_to_text_r1", "text_to_image_r1"} over the whole split (one caption per image)."""
    images, texts = embed_pairs(model, batches, device)
    logits = model.logit_scale.exp().float() * images @ texts.t()
    labels = torch.arange(len(images), device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return {
        "loss": loss.item(),
        "image_to_text_r1": (logits.argmax(dim=1) == labels).float().mean().item(),
        "text_to_image_r1": (logits.argmax(dim=0) == labels).float().mean().item(),
        "pairs": float(len(images)),
    }


class ZeroShotProbe:
    """Zero-shot top-1 on a labelled image set; images are decoded once, at start-up."""

    def __init__(self, data: str, styles: str, split: str, templates: str, preprocess, tokenizer) -> None:
        from clipforge.data.labelled import decode_all, load_labelled_images  # local: only runs that probe need them
        from clipforge.inference.templates import get_templates

        images = load_labelled_images(data, [s for s in styles.split(",") if s] or None, split or None)
        self.pixels, keep = decode_all(images.paths, preprocess)
        if not len(self.pixels):
            raise TrainingError(f"val_zeroshot {data}: no readable images")
        self.images = images.subset(keep)
        self.templates = get_templates(templates)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """{"zeroshot_top1", "zeroshot_top5"} with the model as it is now."""
        from clipforge.inference.zeroshot import build_classifier, evaluate_zero_shot

        model.eval()
        features = torch.cat([model.encode_image(self.pixels[i : i + 256].to(device), normalize=True).float().cpu()
                              for i in range(0, len(self.pixels), 256)])
        classifier = build_classifier(model, self.tokenizer, self.images.classnames, self.templates, cache=False)
        metrics = evaluate_zero_shot(model, features, self.images.labels, classifier)
        out = {"zeroshot_top1": metrics["top1"], "zeroshot_top5": metrics.get("top5")}
        return {k: v for k, v in out.items() if isinstance(v, float) and v == v}  # no top-5 under 6 classes


class Validation:
    """The held-out pairs (loss, R@1) and/or a zero-shot probe, run together."""

    def __init__(self, pairs: Iterable[dict] | None, zeroshot: ZeroShotProbe | None) -> None:
        self.pairs, self.zeroshot = pairs, zeroshot

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Every metric of the split(s), with the model as it is now."""
        metrics = validate(model, self.pairs, device) if self.pairs is not None else {}
        return {**metrics, **(self.zeroshot(model, device) if self.zeroshot is not None else {})}
