"""Zero-shot classification with prompt engineering and OpenAI's prompt ensembling.

Classifier cache: `build_classifier` keeps the last `CACHE_SIZE` classifiers in an LRU dict keyed on
(id(model), weights fingerprint, id(tokenizer), precision, classnames, templates). The fingerprint is every
parameter's and buffer's (autograd version counter, data_ptr, dtype, device): optimizer steps,
`load_state_dict`, in-place updates under `no_grad` and `.to(...)` all change it, so a stale classifier
is never returned. Each entry holds only a weak reference to the model (a dead model's id can be reused,
so hits check identity) and a strong one to the tokenizer (keeping its id unique while cached). Writes
through `param.data` bypass version counters: call `clear_classifier_cache()` after such edits. Cached
classifiers are shared, read-only inference tensors (in-place edits outside inference mode raise).
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from clipforge.errors import EvaluationError
from clipforge.inference.features import autocast_context, iter_text_features, model_device
from clipforge.inference.metrics import classification_metrics
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

CACHE_SIZE = 8
_CACHE: OrderedDict[Hashable, tuple[weakref.ref, Any, torch.Tensor]] = OrderedDict()


def weights_fingerprint(model: torch.nn.Module) -> tuple | None:
    """Cheap fingerprint that changes whenever the weights change in place or move; None if untrackable."""
    try:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device)
                     for t in itertools.chain(model.parameters(), model.buffers()))
    except RuntimeError:  # weights created under inference_mode carry no version counter
        return None


def clear_classifier_cache() -> None:
    """Drop every cached zero-shot classifier."""
    _CACHE.clear()


def _encode_classes(model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                    templates: Sequence[str], batch_size: int, precision: str, modality: str) -> torch.Tensor:
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    tokens = tokenizer(prompts)
    sums: torch.Tensor | None = None
    # Per-class sums of normalised embeddings, streamed: memory is O(classes x dim), not O(prompts x dim).
    for rows, features in iter_text_features(model, tokens, batch_size, precision, modality):
        if sums is None:
            sums = torch.zeros(len(classnames), features.shape[1], device=features.device)
        sums.index_add_(0, (rows // len(templates)).to(features.device), F.normalize(features, dim=-1))
    # mean then renormalise == renormalised sum: the 1/len(templates) factor cancels.
    return F.normalize(sums / len(templates), dim=-1).t().contiguous()


@torch.inference_mode()
def build_classifier(model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str] = ("a photo of a {}.",), batch_size: int = 256, *,
                     cache: bool = True, precision: str = "fp32", modality: str = "text") -> torch.Tensor:
    """[embed_dim, n_classes] weights: per class, mean of L2-normalised template embeddings, renormalised;
    `modality`: class names in a bound text tower's language (its own tokenizer), e.g. "text-ko"."""
    if not classnames:
        raise EvaluationError("no class names given")
    if not templates or any("{}" not in t for t in templates):
        raise EvaluationError(f"every template needs a '{{}}' placeholder, got {list(templates)}")
    fingerprint = weights_fingerprint(model) if cache else None
    key = (id(model), fingerprint, id(tokenizer), precision, modality, tuple(classnames), tuple(templates))
    if fingerprint is not None and key in _CACHE:
        model_ref, _, weights = _CACHE[key]
        if model_ref() is model:
            _CACHE.move_to_end(key)
            return weights
    was_training = model.training
    model.eval()  # dropout (e.g. a MiniLM text tower) would make the classifier random
    try:
        weights = _encode_classes(model, tokenizer, classnames, templates, batch_size, precision, modality)
    finally:
        model.train(was_training)
    if fingerprint is not None:
        _CACHE[key] = (weakref.ref(model), tokenizer, weights)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return weights


def _logit_scale(model: torch.nn.Module | None) -> torch.Tensor:
    scale = getattr(model, "logit_scale", None)
    return torch.tensor(100.0) if scale is None else scale.detach().float().exp()


@torch.inference_mode()
def zero_shot_predict(model: CLIP | None, image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Logits [N, n_classes]: the model's logit scale times cosine similarity (scale 100 without a model)."""
    image = F.normalize(image_features.float(), dim=-1)
    return _logit_scale(model).to(image.device) * image @ classifier.to(image.device, torch.float32)


def evaluate_zero_shot(model: CLIP | None, image_features: torch.Tensor, labels: torch.Tensor,
                       classifier: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1", "top5", "mean_per_class_recall", "samples"} of zero-shot predictions on image features."""
    return classification_metrics(zero_shot_predict(model, image_features, classifier), labels, ks)


@torch.inference_mode()
def classify(model: CLIP, pixels: torch.Tensor, classifier: torch.Tensor, precision: str = "fp32",
             softmax: bool = False, modality: str = "image") -> torch.Tensor:
    """Class probabilities [B, n_classes] of a batch of `modality` (images; a bound tower's inputs, e.g. audio
    spectrograms: emergent zero-shot); bf16 autocast for "bf16".

    CLIP: a softmax of the scaled cosines over the labels. A model with a logit bias (SigLIP): each label's own
    match probability, sigmoid(scale * cosine + bias), as it was trained (they need not sum to 1); `softmax=True`
    gives the softmax over the labels instead, for a comparison."""
    device = model_device(model)
    with autocast_context(device, precision):
        image = model.encode(modality, pixels.to(device), normalize=True).float()
    logits = zero_shot_predict(model, image, classifier)
    bias = getattr(model, "logit_bias", None)
    if bias is None or softmax:
        return logits.softmax(dim=-1)
    return torch.sigmoid(logits + bias.detach().float().to(logits.device))


def zero_shot_head(model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                   templates: Sequence[str]) -> torch.Tensor:
    """[n_classes, embed_dim] fp32 head weights whose logits on normalised image embeddings equal zero-shot's:
    the prompt-ensemble classifier times the model's logit scale."""
    classifier = build_classifier(model, tokenizer, classnames, templates, cache=False)
    return (_logit_scale(model) * classifier.float().t()).clone()
