"""Classification metrics on torch tensors (top-k accuracy, mean per-class recall, confusion matrix)."""
from __future__ import annotations

from typing import Sequence

import torch

from clipforge.errors import EvaluationError


def _as_predictions(preds: torch.Tensor) -> torch.Tensor:
    """Class ids [N] from ids [N] or scores [N, C] (argmax)."""
    preds = torch.as_tensor(preds)
    return (preds.argmax(dim=-1) if preds.dim() == 2 else preds).long().reshape(-1).cpu()


def _check_labels(labels: torch.Tensor, num_classes: int | None, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    if labels.numel() and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise EvaluationError(f"{name} must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k highest scores}; k is capped at the class count."""
    if logits.dim() != 2 or logits.shape[0] != len(labels):
        raise EvaluationError(f"logits must be [N, C] with N = len(labels), "
                              f"got {tuple(logits.shape)} and {len(labels)}")
    if not len(labels):
        raise EvaluationError("no samples")
    labels = _check_labels(labels, logits.shape[1]).to(logits.device)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = (top == labels[:, None]).long().cumsum(dim=1)  # hits[:, j]: label within the top j+1
    return {k: hits[:, min(k, logits.shape[1]) - 1].double().mean().item() for k in ks}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """LongTensor [C, C]: row = true class, column = predicted class (scikit-learn's convention)."""
    preds, labels = _check_labels(_as_predictions(preds), num_classes, "preds"), _check_labels(labels, num_classes)
    if preds.shape != labels.shape:
        raise EvaluationError(f"preds and labels differ in length: {len(preds)} vs {len(labels)}")
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_recall(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Recall of each class [C]; NaN for classes absent from `labels`."""
    matrix = confusion_matrix(preds, labels, num_classes).double()
    support = matrix.sum(dim=1)
    return torch.where(support > 0, matrix.diagonal() / support.clamp(min=1), torch.nan)


def mean_per_class_recall(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in `labels` (= sklearn recall_score macro over those labels)."""
    if not len(labels):
        raise EvaluationError("no samples")
    # Absent classes have no defined recall; averaging only present ones matches balanced accuracy.
    return per_class_recall(preds, labels, num_classes).nanmean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1", "top5", ..., "mean_per_class_recall", "samples"} from scores [N, C]."""
    ks = tuple(k for k in ks if k == 1 or k < logits.shape[1])  # top-k with k >= C is trivially 1
    out = {f"top{k}": v for k, v in topk_accuracy(logits, labels, ks).items()}
    out["mean_per_class_recall"] = mean_per_class_recall(logits, labels, logits.shape[1])
    out["samples"] = float(len(labels))
    return out
