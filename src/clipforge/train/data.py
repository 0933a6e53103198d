"""Training and validation data for a TrainConfig (maps its fields onto the data pipeline's DataConfig)."""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from torch.utils.data import DataLoader

from clipforge.data.captions import CaptionDataset
from clipforge.data.loader import DataConfig, SkipCounter, TrainLoader, build_from_config, collate_samples
from clipforge.distributed import DistInfo
from clipforge.errors import TrainingError
from clipforge.train.config import TrainConfig


@dataclass
class TrainData:
    """The resumable loader, its skip accounting, and the epoch length when it is known."""

    loader: TrainLoader
    skips: SkipCounter
    steps_per_epoch: int | None  # None for streamed shards
    # Bad captions (empty, not UTF-8) of images that still have a good one: dropped once, when the table is read.
    dropped_captions: Counter = field(default_factory=Counter)


def build_train_data(config: TrainConfig, transform: Callable, tokenizer: Callable, info: DistInfo) -> TrainData:
    """Loader over the caption CSV/TSV or shards, split across ranks."""
    data_config = DataConfig(
        train_data=config.train_data, image_column=config.image_column, caption_column=config.caption_column,
        key_column=config.key_column or None, caption_separator=config.caption_separator or None,
        batch_size=config.batch_size, workers=config.workers, seed=config.seed, image_size=transform.image_size,
        composite_white=config.composite_white, unique_keys=config.unique_keys and bool(config.key_column)
        and ".tar" not in config.train_data,
        decoded_cache=config.decoded_cache, decoded_cache_dir=config.decoded_cache_dir,
    )
    loader = build_from_config(data_config, tokenizer, rank=info.rank, world_size=info.world_size, transform=transform)
    if data_config.is_shards and not config.steps:
        raise TrainingError("webdataset shards have no length: set steps (--steps N)")
    steps = None if data_config.is_shards else len(loader)
    if steps == 0:
        raise TrainingError(f"{config.train_data}: fewer samples than one global batch "
                         f"({config.batch_size} x {info.world_size} processes)")
    dropped = getattr(loader.dataset, "dropped_captions", None) or Counter()
    return TrainData(loader, SkipCounter(), steps, Counter(dropped))


def build_val_data(config: TrainConfig, transform: Callable, tokenizer: Callable, batch_size: int = 256) -> DataLoader:
    """Held-out pairs (eval transform; caption choice fixed by the seed)."""
    tokenizer = functools.partial(tokenizer, truncate=True)  # as in training: a long caption is cut
    dataset = CaptionDataset(
        config.val_data, transform, tokenizer,
        image_column=config.image_column, caption_column=config.caption_column,
        caption_separator=config.caption_separator or None, seed=config.seed,
    )
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples)

