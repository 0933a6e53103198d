"""The embedding core shared by evaluate, search, serve and train: batched features, zero-shot classifiers,
prompt templates, top-k similarity and classification metrics."""
from clipforge.inference.features import extract_image_features, extract_text_features, labelled_image_features
from clipforge.inference.similarity import chunked_topk
from clipforge.inference.templates import get_templates, list_templates
from clipforge.inference.zeroshot import build_classifier, classify, evaluate_zero_shot, zero_shot_predict

__all__ = ["build_classifier", "chunked_topk", "classify", "evaluate_zero_shot", "extract_image_features",
           "extract_text_features", "get_templates", "labelled_image_features", "list_templates",
           "zero_shot_predict"]
