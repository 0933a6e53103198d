"""WiSE-FT (Wortsman et al. 2022): the weights of a zero-shot and a fine-tuned CLIP, interpolated.

The zero-shot end gets the head a fine-tuned model started from (its class names, its templates, the zero-shot
model's text tower), so `alpha` 0 is the zero-shot classifier and 1 the fine-tuned one, exactly.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from clipforge.data.labelled import LabelledImages
from clipforge.errors import ConfigError
from clipforge.inference.features import model_device
from clipforge.inference.zeroshot import zero_shot_head
from clipforge.model import CLIP
from clipforge.model.towers import tokenizer_for

HEAD_FIELDS = ("classnames", "head_templates")


def _architecture(model: CLIP) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in HEAD_FIELDS}


def refuse_mismatch(zero_shot: CLIP, finetuned: CLIP) -> None:
    """ConfigError naming the first difference between two models that cannot be interpolated."""
    if finetuned.head is None:
        raise ConfigError("the fine-tuned model has no classification head: give the output of clipforge finetune")
    a, b = _architecture(zero_shot), _architecture(finetuned)
    if a != b:
        field = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise ConfigError(f"different architectures cannot be interpolated: {field} is {a.get(field)!r} in the "
                          f"zero-shot model and {b.get(field)!r} in the fine-tuned one")
    shapes_a = {k: v.shape for k, v in zero_shot.state_dict().items() if not k.startswith("head.")}
    shapes_b = {k: v.shape for k, v in finetuned.state_dict().items() if not k.startswith("head.")}
    if shapes_a != shapes_b:
        key = next(k for k in sorted(set(shapes_a) | set(shapes_b)) if shapes_a.get(k) != shapes_b.get(k))
        raise ConfigError(f"different weights cannot be interpolated: {key} is {shapes_a.get(key)} in the "
                          f"zero-shot model and {shapes_b.get(key)} in the fine-tuned one")


def zero_shot_end(zero_shot: CLIP, finetuned: CLIP, tokenizer: Callable | None = None,
                  templates: Sequence[str] | None = None) -> CLIP:
    """A copy of `zero_shot` with the zero-shot head for the fine-tuned model's classes (its own when it has one)."""
    start = copy.deepcopy(zero_shot)
    if start.classnames == finetuned.classnames:
        return start
    templates = list(templates or finetuned.config.head_templates or ["a photo of a {}."])
    tokenizer = tokenizer or tokenizer_for(start.config, context_length=start.context_length)
    start.set_head(zero_shot_head(start, tokenizer, finetuned.classnames, templates), finetuned.classnames,
                   templates=templates)
    return start


def _mix(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0:
        return a.clone()
    if alpha == 1 or not b.is_floating_point():  # counters and ids are the fine-tuned model's
        return b.clone()
    return ((1 - alpha) * a.to(b.dtype) + alpha * b).to(b.dtype)


def wise(zero_shot: CLIP, finetuned: CLIP, alpha: float, tokenizer: Callable | None = None,
         templates: Sequence[str] | None = None) -> CLIP:
    """(1 - alpha) * zero-shot + alpha * fine-tuned, every weight and the classification head; a new model."""
    refuse_mismatch(zero_shot, finetuned)
    start = zero_shot_end(zero_shot, finetuned, tokenizer, templates)
    return interpolate(start, finetuned, alpha)


def interpolate(start: CLIP, finetuned: CLIP, alpha: float) -> CLIP:
    """The mixture of two models of one architecture and one head (`zero_shot_end` gives `start` its head)."""
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    a, b = start.state_dict(), finetuned.state_dict()
    mixed = {key: _mix(a[key].to(value.device), value, alpha) for key, value in b.items()}
    source = start if alpha == 0 else finetuned
    model = CLIP(copy.deepcopy(source.config), pretrained_text=False)
    model.load_state_dict(mixed)
    model.preprocess_config = source.preprocess_config
    return model.to(model_device(finetuned)).eval()


def head_labels(images: LabelledImages, classnames: Sequence[str]) -> torch.Tensor:
    """Each image's class as an index into a head's `classnames`; ConfigError for a class the head lacks."""
    unknown = sorted(set(images.classnames) - set(classnames))
    if unknown:
        raise ConfigError(f"{images.source}: classes the classification head does not know: {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''}")
    index = {name: i for i, name in enumerate(classnames)}
    return torch.tensor([index[images.classnames[i]] for i in images.labels.tolist()])


@torch.no_grad()
def head_top1(model: CLIP, pixels: torch.Tensor, images: LabelledImages, batch_size: int = 256) -> dict[str, float]:
    """Top-1 of the model's head per style of `images` (decoded as `pixels`) and their mean over styles."""
    device = model_device(model)
    model.eval()
    logits = torch.cat([model.classify(pixels[i : i + batch_size].to(device, model.dtype)).float().cpu()
                        for i in range(0, len(pixels), batch_size)])
    correct = (logits.argmax(dim=1) == head_labels(images, model.classnames)).float()
    out = {f"top1_{s or 'all'}": correct[[d == s for d in images.domains]].mean().item()
           for s in sorted(set(images.domains))}
    return {**out, "top1_mean": sum(out.values()) / len(out)}
