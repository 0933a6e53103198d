"""Evaluation: zero-shot classification, retrieval, linear probes and a supervised baseline."""
from __future__ import annotations

import importlib
from typing import Any

from clipforge.evaluate.retrieval import retrieval_recall
from clipforge.evaluate.supervised import LinearClassifier, evaluate_classifier, train_supervised
from clipforge.inference.features import (
    extract_image_features,
    extract_labeled_image_features,
    extract_text_features,
)
from clipforge.inference.metrics import (
    classification_metrics,
    confusion_matrix,
    mean_per_class_recall,
    per_class_recall,
    topk_accuracy,
)
from clipforge.inference.similarity import chunked_topk
from clipforge.inference.templates import get_templates, imagenet_classnames, list_templates
from clipforge.inference.zeroshot import (
    OPENAI_TEMPLATES_7,
    build_classifier,
    classify,
    clear_classifier_cache,
    evaluate_zero_shot,
    weights_fingerprint,
    zero_shot_predict,
)

# Lazy: scikit-learn is imported only when a linear-probe name is first used.
_LAZY = ("evaluate_linear_probe", "fit_logistic_regression", "stratified_split")

__all__ = [
    "LinearClassifier", "OPENAI_TEMPLATES_7", "build_classifier", "chunked_topk", "classification_metrics",
    "classify", "clear_classifier_cache", "confusion_matrix", "evaluate_classifier", "evaluate_zero_shot",
    "extract_image_features", "extract_labeled_image_features", "extract_text_features", "get_templates",
    "imagenet_classnames", "list_templates", "mean_per_class_recall", "per_class_recall", "retrieval_recall",
    "topk_accuracy", "train_supervised", "weights_fingerprint", "zero_shot_predict", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("clipforge.evaluate.linear_probe"), name)
    raise AttributeError(f"module 'clipforge.evaluate' has no attribute {name!r}")
