"""Data: image preprocessing (and, later, datasets)."""
from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, composite_on_white, image_transform

__all__ = ["CLIP_MEAN", "CLIP_STD", "EvalTransform", "TrainTransform", "composite_on_white", "image_transform"]
