"""Training DataLoader: config, collate with skip counts, resumable loader state, skip reporting."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from clipforge.data.captions import (
    DEFAULT_MAX_PIXELS,
    SKIP_REASONS,
    CaptionDataset,
    Skipped,
    Tokenizer,
    TruncatingTokenizer,
)
from clipforge.data.images import SkippedFile
from clipforge.data.sampling import ResumableBatchSampler
from clipforge.data.transforms import TrainTransform
from clipforge.errors import DataError


def collate_samples(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Stack good samples and count Skipped markers by reason (an all-skipped batch has size 0)."""
    good = [s for s in items if not isinstance(s, Skipped)]
    bad = [s for s in items if isinstance(s, Skipped)]
    return {
        "pixels": torch.stack([s["pixels"] for s in good]) if good else torch.empty(0),
        "tokens": torch.stack([s["tokens"] for s in good]) if good else torch.empty(0, dtype=torch.long),
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "keys": [s["key"] for s in good],
        "skipped": Counter(s.reason for s in bad),
        "skipped_samples": bad,  # reason, index and detail (file name), for logging
        # Bad captions beside a good one (shards find them while streaming; CSVs when the table is read).
        "captions_dropped": sum((Counter(s.get("captions_dropped", {})) for s in good), Counter()),
        "captions_truncated": sum(s.get("caption_truncated", 0) for s in good),  # cut to the context
    }


class SkipCounter:
    """Skipped samples by reason, this epoch and in total, accumulated from batches' "skipped" counts."""

    def __init__(self, max_examples: int = 5) -> None:
        """Empty counts; keep up to `max_examples` Skipped markers per epoch for the log."""
        self.epoch: Counter = Counter()
        self.total: Counter = Counter()
        self.seen_epoch = self.seen_total = 0
        self.max_examples = max_examples
        self.examples: list[Skipped] = []
        self.captions: Counter = Counter()  # bad captions dropped beside good ones, counted each time read
        self.truncated = self.truncated_epoch = 0  # captions cut to the context, in total and this epoch
        self.files: set[SkippedFile] = set()  # each skipped file once (it is skipped again every epoch)

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one batch's counts (seen = kept + skipped)."""
        skipped: Counter = batch["skipped"]
        seen = len(batch["indices"]) + sum(skipped.values())
        self.add(skipped, seen)
        self.captions.update(batch.get("captions_dropped", {}))
        cut = int(batch.get("captions_truncated", 0))
        self.truncated += cut
        self.truncated_epoch += cut
        self.files.update(SkippedFile(s.path or s.detail, s.reason) for s in batch.get("skipped_samples", []))
        room = self.max_examples - len(self.examples)
        if room > 0:
            self.examples.extend(batch.get("skipped_samples", [])[:room])

    def add(self, counts: Mapping[str, int], seen: int = 0) -> None:
        """Add counts by reason (e.g. summed over ranks) and the number of samples seen."""
        self.epoch.update(counts)
        self.total.update(counts)
        self.seen_epoch += seen
        self.seen_total += seen

    def new_epoch(self) -> None:
        """Reset the per-epoch counts."""
        self.epoch, self.seen_epoch, self.examples, self.truncated_epoch = Counter(), 0, [], 0

    @staticmethod
    def _part(counts: Counter, seen: int) -> str:
        n = sum(counts.values())
        share = f" ({100 * n / seen:.2f}%)" if seen else ""
        # Known reasons first in a fixed order, so reports line up from epoch to epoch.
        order = [r for r in SKIP_REASONS if counts[r]] + sorted(r for r in counts if r not in SKIP_REASONS)
        reasons = ", ".join(f"{r}={counts[r]}" for r in order)
        return f"{n}/{seen}{share}" + (f" [{reasons}]" if reasons else "")

    def epoch_total(self) -> int:
        """Samples skipped this epoch."""
        return sum(self.epoch.values())

    def totals(self) -> dict[str, int]:
        """Samples skipped in total, by reason."""
        return dict(self.total)

    def report_epoch(self) -> str:
        """This epoch: "skipped/seen (share) [reason=count, ...]"."""
        return self._part(self.epoch, self.seen_epoch)

    def report_total(self) -> str:
        """The same for the whole run, or "" when nothing was skipped."""
        return self._part(self.total, self.seen_total) if self.total else ""

    def report(self) -> str:
        """One line: skipped/seen this epoch with reasons, then the running total."""
        return f"skipped this epoch {self.report_epoch()}; in total {self._part(self.total, self.seen_total)}"

    def state_dict(self) -> dict[str, Any]:
        """Counts to checkpoint with the run."""
        return {"epoch": dict(self.epoch), "total": dict(self.total), "seen_epoch": self.seen_epoch,
                "seen_total": self.seen_total, "captions": dict(self.captions), "truncated": self.truncated,
                "truncated_epoch": self.truncated_epoch, "files": [list(f) for f in sorted(self.files)]}

    @classmethod
    def merged(cls, states: Sequence[Mapping[str, Any]]) -> "SkipCounter":
        """One counter holding several (e.g. every rank's) state_dicts together: counts summed, files joined."""
        merged = cls()
        for state in states:
            part = cls()
            part.load_state_dict(state)
            merged.epoch += part.epoch
            merged.total += part.total
            merged.captions += part.captions
            merged.seen_epoch += part.seen_epoch
            merged.seen_total += part.seen_total
            merged.truncated += part.truncated
            merged.truncated_epoch += part.truncated_epoch
            merged.files |= part.files
        return merged

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counts saved by state_dict (an empty dict: start from zero)."""
        self.epoch, self.total = Counter(state.get("epoch", {})), Counter(state.get("total", {}))
        self.seen_epoch, self.seen_total = int(state.get("seen_epoch", 0)), int(state.get("seen_total", 0))
        self.captions = Counter(state.get("captions", {}))
        self.truncated, self.truncated_epoch = int(state.get("truncated", 0)), int(state.get("truncated_epoch", 0))
        self.files = {SkippedFile(*f) for f in state.get("files", [])}


class _EpochTagged:
    """Batch sampler view yielding (epoch, index): workers' dataset copies never see set_epoch."""

    def __init__(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, index) for index in batch]


def _worker_init(worker_id: int) -> None:
    # Each worker would otherwise start as many intra-op threads as there are cores.
    torch.set_num_threads(1)


class TrainLoader(DataLoader):
    """DataLoader whose state_dict() counts batches delivered to the trainer, not prefetched ones."""

    def __init__(self, dataset: Dataset, resumable: Any = None, **kwargs: Any) -> None:
        """DataLoader(dataset, **kwargs); `resumable` is the ResumableBatchSampler or ShardDataset."""
        super().__init__(dataset, **kwargs)
        self.resumable = resumable
        self._position: dict[str, Any] | None = None

    def _start(self) -> dict[str, Any]:
        r = self.resumable
        if isinstance(r, ResumableBatchSampler):
            return {**r.state_dict(), "batches": r.resume_point()}
        samples, batches = r.resume_point()
        return {
            "epoch": r.epoch, "samples": samples, "batches": batches, "seed": r.seed,
            "batch_size": self.batch_size, "workers": self.num_workers,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        """Batches of the current epoch, from the resume point if one was loaded."""
        if self.resumable is None:
            yield from super().__iter__()
            return
        position = self._position = self._start()  # read before the pass consumes the resume point
        for batch in super().__iter__():
            position["batches"] += 1
            if "samples" in position:
                position["samples"] += len(batch["indices"]) + sum(batch["skipped"].values())
            yield batch
        if hasattr(self.resumable, "clear_resume"):
            self.resumable.clear_resume()

    def state_dict(self) -> dict[str, Any]:
        """Where the trainer stands: {"epoch", "batches" (and "samples" for shards), ...}."""
        if self.resumable is None:
            raise DataError("this loader has no resumable sampler or dataset")
        # A set_epoch made on the sampler/dataset directly also makes the last pass's position stale.
        fresh = self._position is None or self._position["epoch"] != self.resumable.epoch
        return self._start() if fresh else dict(self._position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state` (from state_dict): the next pass starts at the next undelivered sample."""
        self.resumable.load_state_dict(dict(state))
        self._position = None

    def set_epoch(self, epoch: int) -> None:
        """Forward to the sampler or shard dataset."""
        self.resumable.set_epoch(epoch)
        self._position = None


def build_train_loader(
    dataset: Dataset, sampler: Any = None, workers: int = 0, collate: Callable = collate_samples, *,
    batch_size: int | None = None, pin_memory: bool = False, prefetch_factor: int | None = None,
) -> TrainLoader:
    """Training DataLoader: a batch sampler for map-style datasets, `batch_size` for iterable ones."""
    kwargs: dict[str, Any] = {
        "num_workers": workers, "collate_fn": collate, "pin_memory": pin_memory,
        "persistent_workers": workers > 0, "worker_init_fn": _worker_init if workers > 0 else None,
    }
    if workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    if isinstance(dataset, IterableDataset):
        if sampler is not None or batch_size is None:
            raise DataError("an iterable dataset takes batch_size=, not a sampler")
        resumable = dataset if hasattr(dataset, "resume_point") else None
        return TrainLoader(dataset, resumable, batch_size=batch_size, **kwargs)
    if sampler is None:
        raise DataError("a map-style dataset needs a batch sampler (ResumableBatchSampler)")
    if isinstance(sampler, ResumableBatchSampler):
        return TrainLoader(dataset, sampler, batch_sampler=_EpochTagged(sampler), **kwargs)
    return TrainLoader(dataset, None, batch_sampler=sampler, **kwargs)


@dataclass
class DataConfig:
    """Training-data settings: a caption CSV/TSV or webdataset shards, batching and sample checks."""

    train_data: str = ""  # CSV/TSV file, or shards: "data-{000..009}.tar", a glob, "a.tar::b.tar"
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None  # concept key column (CSV) or JSON field (shards)
    delimiter: str | None = None  # default from the suffix: .csv -> ",", .tsv -> tab
    caption_separator: str | None = None  # splits one cell into several captions
    csv_quoting: bool = True  # False: quotes are plain text (raw TSV dumps)
    batch_size: int = 256  # per rank
    workers: int = 4
    seed: int = 0
    image_size: int = 224
    max_pixels: int = DEFAULT_MAX_PIXELS
    composite_white: bool = False  # blend transparency on white (emoji PNGs)
    unique_keys: bool = False  # no two samples with one concept key in a global batch (CSV only)
    shuffle_buffer: int = 0  # shards only: samples mixed across neighbouring batches
    decoded_cache: bool = False  # CSV only: decode every image once into a memory-mapped cache, augment tensors
    decoded_cache_dir: str = ""  # default $CLIPFORGE_CACHE/decoded or ~/.cache/clipforge/decoded

    @property
    def is_shards(self) -> bool:
        """Whether train_data names tar shards."""
        return ".tar" in self.train_data


def build_from_config(
    config: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1, transform: Callable | None = None,
) -> TrainLoader:
    """Dataset, sampler and TrainLoader for a config (TrainTransform of config.image_size by default)."""
    transform = transform or TrainTransform(config.image_size, composite_white=config.composite_white)
    if not getattr(tokenizer, "takes_rng", False):  # a column of another modality (audio) is not text
        tokenizer = TruncatingTokenizer(tokenizer)  # an over-long caption is cut (and counted), not fatal
    if config.decoded_cache and (config.is_shards or not isinstance(transform, TrainTransform)):
        raise DataError("decoded_cache needs a CSV/TSV dataset and the standard TrainTransform")
    if config.unique_keys and (config.is_shards or not config.key_column):
        raise DataError("unique_keys needs a CSV/TSV dataset (a sampler) and key_column")
    if config.is_shards:
        from clipforge.data.shards import ShardDataset  # webdataset is only needed for shards

        shards = ShardDataset(
            config.train_data, transform, tokenizer, seed=config.seed, max_pixels=config.max_pixels,
            caption_separator=config.caption_separator, key_field=config.key_column, rank=rank,
            world_size=world_size, shuffle_buffer=config.shuffle_buffer,
        )
        return build_train_loader(shards, None, config.workers, batch_size=config.batch_size)
    table = dict(image_column=config.image_column, caption_column=config.caption_column,
                 key_column=config.key_column, delimiter=config.delimiter, caption_separator=config.caption_separator,
                 quoting=config.csv_quoting, seed=config.seed, max_pixels=config.max_pixels)
    if config.decoded_cache:
        from clipforge.data.decoded import DecodedCaptionDataset, stored_size_for, tensor_transform_like

        dataset: CaptionDataset = DecodedCaptionDataset(
            config.train_data, tensor_transform_like(transform), tokenizer, composite_white=transform.composite_white,
            stored_size=stored_size_for(transform.image_size, transform.scale[0]),
            cache_dir=config.decoded_cache_dir or None, progress=rank == 0, **table)
    else:
        dataset = CaptionDataset(config.train_data, transform, tokenizer, **table)
    sampler = ResumableBatchSampler(
        len(dataset), config.batch_size, world_size=world_size, rank=rank, seed=config.seed,
        keys=dataset.keys if config.unique_keys else None,
    )
    # The decoded cache augments whole batches: its collate does the tensor work.
    return build_train_loader(dataset, sampler, config.workers, getattr(dataset, "collate", collate_samples))
