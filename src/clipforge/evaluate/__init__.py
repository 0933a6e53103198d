"""Evaluation: zero-shot classification (more tasks build on it)."""
from clipforge.evaluate.zeroshot import OPENAI_TEMPLATES_7, build_classifier, classify

__all__ = ["OPENAI_TEMPLATES_7", "build_classifier", "classify"]
