"""Data: image preprocessing, caption datasets (CSV/TSV, webdataset shards), resumable sampling and loading."""
from clipforge.data.captions import DEFAULT_MAX_PIXELS, SKIP_REASONS, CaptionDataset, Skipped
from clipforge.data.loader import (
    DataConfig,
    SkipCounter,
    TrainLoader,
    build_from_config,
    build_train_loader,
    collate_samples,
)
from clipforge.data.sampling import ResumableBatchSampler
from clipforge.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    TrainTransform,
    composite_on_white,
    image_transform,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "CaptionDataset", "DEFAULT_MAX_PIXELS", "DataConfig", "EvalTransform",
    "ResumableBatchSampler", "SKIP_REASONS", "SkipCounter", "Skipped", "TrainLoader", "TrainTransform",
    "build_from_config", "build_train_loader", "collate_samples", "composite_on_white", "image_transform",
]
