"""Image-text retrieval recall@k with several captions per image, in bounded memory.

Similarities are computed block by block (`chunk_size` queries x `chunk_size` keys) and only a running
top-k of each query is kept: `torch.topk` of every block is merged with the running top-k. Peak memory
is O(chunk_size^2 + N x k) instead of the dense N_images x N_texts matrix (40 GB at 100k x 100k fp32).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from clipforge.errors import EvaluationError
from clipforge.inference.similarity import chunked_topk


def _check(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise EvaluationError("features must be [N, D] matrices")
    text_to_image = torch.as_tensor(text_to_image).long().reshape(-1)
    if len(text_to_image) != len(text_features):
        raise EvaluationError(f"text_to_image has {len(text_to_image)} entries for {len(text_features)} texts")
    if len(text_to_image) == 0 or len(image_features) == 0:
        raise EvaluationError("no images or no texts")
    if text_to_image.min() < 0 or text_to_image.max() >= len(image_features):
        raise EvaluationError(f"text_to_image must index the {len(image_features)} images")
    return text_to_image


@torch.inference_mode()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int = 4096,
                     normalize: bool = True) -> dict[str, float]:
    """{"image_to_text_r{k}", "text_to_image_r{k}"}: image->text counts a hit if ANY of its captions is in the top k."""
    text_to_image = _check(image_features, text_features, text_to_image)
    # fp32 similarities: bf16 features would create many spurious ties.
    images, texts = image_features.float(), text_features.float()
    if normalize:
        images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    text_to_image = text_to_image.to(images.device)
    k_texts, k_images = min(max(ks), len(texts)), min(max(ks), len(images))

    top_texts = chunked_topk(images, texts.to(images.device), k_texts, chunk_size)
    # hit[i, j]: the j-th retrieved caption belongs to image i; the cumulative sum turns it into "a hit within j+1".
    own = text_to_image[top_texts] == torch.arange(len(images), device=images.device)[:, None]
    i2t = own.long().cumsum(dim=1) > 0
    del top_texts, own
    top_images = chunked_topk(texts.to(images.device), images, k_images, chunk_size)
    t2i = (top_images == text_to_image[:, None]).long().cumsum(dim=1) > 0

    out: dict[str, float] = {}
    # Images without any caption can never be retrieved correctly; they count as misses (as dense code would).
    for k in ks:
        out[f"image_to_text_r{k}"] = i2t[:, min(k, k_texts) - 1].double().mean().item()
    for k in ks:
        out[f"text_to_image_r{k}"] = t2i[:, min(k, k_images) - 1].double().mean().item()
    return out
