"""Zero-shot classification with prompt engineering and OpenAI's prompt ensembling."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from clipforge.model.clip import CLIP

# The 7-template subset OpenAI found best on ImageNet (CLIP prompt-engineering notebook).
OPENAI_TEMPLATES_7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@torch.inference_mode()
def build_classifier(model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str] = ("a photo of a {}.",), batch_size: int = 256) -> torch.Tensor:
    """[embed_dim, n_classes] weights: per class, mean of L2-normalised template embeddings, renormalised."""
    if not classnames:
        raise ValueError("no class names given")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' placeholder, got {list(templates)}")
    prompts = [template.format(name) for name in classnames for template in templates]
    device = next(model.parameters()).device
    chunks = [model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device), normalize=True).float()
              for i in range(0, len(prompts), batch_size)]
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).t()


@torch.inference_mode()
def classify(model: CLIP, pixels: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class probabilities [B, n_classes] (softmax of scaled cosine similarity)."""
    device = next(model.parameters()).device
    image = model.encode_image(pixels.to(device), normalize=True).float()
    return (model.logit_scale.exp().float() * image @ classifier).softmax(dim=-1)
