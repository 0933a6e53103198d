"""Validation hook: contrastive loss and retrieval R@1 on a held-out split."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed_pairs(model: torch.nn.Module, batches: Iterable[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised fp32 image and text embeddings of every (image, caption) pair in `batches`."""
    model.eval()
    images, texts = [], []
    for batch in batches:
        images.append(model.encode_image(batch["pixels"].to(device), normalize=True).float())
        texts.append(model.encode_text(batch["tokens"].to(device), normalize=True).float())
    if not images:
        raise ValueError("validation split is empty")
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
