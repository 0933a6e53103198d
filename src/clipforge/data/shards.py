"""webdataset tar shards as an iterable dataset: split by rank and worker, bad samples and shards skipped."""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
import random
from collections import Counter
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from clipforge.data.captions import (
    DEFAULT_MAX_PIXELS,
    SampleError,
    Skipped,
    Tokenizer,
    make_sample,
    sample_rng,
    sort_captions,
    split_captions,
    takes_rng,
    with_composite_white,
)
from clipforge.data.images import IMAGE_EXTENSIONS
from clipforge.errors import DataError

SHARD_STRIDE = 1 << 32  # sample index = shard number * SHARD_STRIDE + position in the shard
_EPOCH, _SAMPLES, _BATCHES = range(3)  # shared state: epoch, samples, batches, batch_size, workers


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern ("d-{000..009}.tar", "::"-joined) or a list; globs allowed.

    Local shards must exist: ValueError names the pattern that matched nothing or the missing shards.
    """
    patterns = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [os.fspath(u) for u in urls]
    shards: list[str] = []
    for url in patterns:
        if _is_local(url) and glob.has_magic(url):
            matched = sorted(glob.glob(_local_path(url)))
            if not matched:
                raise DataError(f"no shard files match {url!r}")
            shards.extend(matched)
        else:
            shards.append(url)
    if not shards:
        raise DataError(f"no shards in {urls!r}")
    missing = [u for u in shards if _is_local(u) and not os.path.isfile(_local_path(u))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(shards)} shards not found: {missing[:3]}{more}")
    return shards


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Deterministic shuffle buffer: mixes neighbouring samples (often from one source) across batches."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """Image-caption samples streamed from webdataset tar shards (image jpg/jpeg/png/webp + txt/json).

    Each epoch the shard list is shuffled from (seed, epoch), split across ranks (node splitter)
    and then across DataLoader workers (worker splitter). Items are sample dicts or `Skipped`
    markers (unreadable shards and members too, reason "bad_shard"), batched by
    DataLoader(batch_size=...) with the shared collate function, which counts and drops markers.
    Ranks can get different sample counts (shards differ in size): cap the steps per epoch
    in the trainer for distributed runs.

    Resume (`load_state_dict` with stream items consumed): exact with workers=0; with the same
    number of workers and batch size it is also exact unless a worker had already run dry
    (the DataLoader then changes its round-robin), otherwise approximate by shard order.
    """

    def __init__(
        self, urls: str | Sequence[str], transform: Callable, tokenizer: Tokenizer, *, seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS, caption_separator: str | None = None, key_field: str | None = None,
        rank: int | None = None, world_size: int | None = None, shuffle_shards: bool = True,
        shuffle_buffer: int = 0, composite_white: bool | None = None,
    ) -> None:
        """Expand and check the shard list (ValueError at start-up for missing shards)."""
        self.shards = expand_shards(urls)
        if world_size is None:  # default: the initialised process group, else a single rank
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist and rank is None else rank
        rank = rank or 0
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if len(self.shards) < world_size:
            raise DataError(f"{len(self.shards)} shards cannot be split over {world_size} ranks")
        self.rank, self.world_size = rank, world_size
        self.transform = with_composite_white(transform, composite_white)
        self.tokenizer = tokenizer
        self.seed, self.max_pixels = seed, max_pixels
        self.caption_separator, self.key_field = caption_separator, key_field
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self._pass_rng = takes_rng(self.transform)
        # Shared memory: DataLoader workers (persistent ones too) hold copies of this object, and
        # must still see set_epoch and resume points made later in the main process.
        self._state = multiprocessing.RawArray("q", 5)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return int(self._state[_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order; a pending resume point survives only for its own epoch."""
        if epoch != self.epoch:
            self._state[:] = [epoch, 0, 0, 0, 0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume epoch `state["epoch"]` after `state["samples"]` stream items (from TrainLoader.state_dict)."""
        if "seed" in state and state["seed"] != self.seed:
            raise DataError(f"cannot resume: checkpoint has seed={state['seed']}, dataset has {self.seed}")
        fields = ("epoch", "samples", "batches", "batch_size", "workers")
        self._state[:] = [int(state.get(f) or 0) for f in fields]

    def clear_resume(self) -> None:
        """Forget the resume point (after the resumed pass is over)."""
        self._state[:] = [self.epoch, 0, 0, 0, 0]

    def resume_point(self) -> tuple[int, int]:
        """(stream items, batches) of the current epoch consumed before this pass."""
        return int(self._state[_SAMPLES]), int(self._state[_BATCHES])

    def shards_for(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[tuple[int, str]]:
        """(shard number, url) read by one worker of this rank in an epoch."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            random.Random(f"clipforge-shards:{self.seed}:{epoch}").shuffle(order)
        return [(n, self.shards[n]) for n in order[self.rank :: self.world_size][worker::num_workers]]

    def _worker_plan(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(role, items to skip): which worker's share this worker reads, and where it resumes."""
        _, samples, batches, batch_size, workers = self._state[:]
        if samples == 0:
            return worker, 0
        if max(workers, 1) == num_workers == 1:
            return 0, samples
        if workers == num_workers and batch_size > 0:
            # The DataLoader takes batch j from worker j % W; after the restart it asks worker 0
            # first, so worker w plays the part of the worker that owed batch `batches + w`.
            offset = batches % num_workers
            role = (worker + offset) % num_workers
            return role, (batches // num_workers + (role < offset)) * batch_size
        return worker, samples // num_workers + (worker < samples % num_workers)

    @staticmethod
    def _members(stream: Any, url: str, errors: list[Exception]) -> Iterator[dict]:
        """Tar members as webdataset file dicts; a read error ends the shard but keeps what came before."""
        try:
            for member in tar_file_iterator(stream, handler=lambda error: errors.append(error) or True):
                member["__url__"] = url
                yield member
        except Exception as error:  # truncated or corrupt tar: the rest of the shard is lost
            errors.append(error)

    def _raw(self, shards: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict] | Skipped]:
        """(index, raw sample) per tar group, then one Skipped("bad_shard") per shard with read errors.

        A tar cut exactly between two members looks like a shorter shard to tarfile: nothing to
        count there but the incomplete last sample, if any (counted by what it lacks).
        """
        for number, url in shards:
            errors: list[Exception] = []
            try:
                stream = wds.gopen(url)
            except Exception as error:  # any opener failure (missing file, pipe, network)
                yield Skipped("bad_shard", -1, f"{url}: {type(error).__name__}: {error}", str(url))
                continue
            try:
                samples = group_by_keys(self._members(stream, url, errors),
                                        handler=lambda e, errors=errors: errors.append(e) or True)
                for position, sample in enumerate(samples):
                    yield number * SHARD_STRIDE + position, sample
            finally:
                stream.close()
            if errors:
                first = errors[0]
                yield Skipped("bad_shard", -1,
                              f"{url}: {len(errors)} read error(s), first {type(first).__name__}: {first}", str(url))

    def _captions(self, raw: dict, name: str) -> tuple[list[str], str | None, Counter]:
        """(usable captions, concept key, bad captions dropped beside them by reason) of a raw sample,
        or SampleError."""
        meta: Any = None
        if "json" in raw and ("txt" not in raw or self.key_field):
            try:
                meta = json.loads(raw["json"])
            except UnicodeDecodeError:
                raise SampleError("bad_encoding", f"{name}.json is not UTF-8") from None
            except ValueError as error:
                raise SampleError("bad_encoding", f"{name}.json: invalid JSON ({error})") from None
        meta = meta if isinstance(meta, dict) else {}
        key = meta.get(self.key_field) if self.key_field else None
        if "txt" in raw:
            try:
                texts = split_captions(raw["txt"].decode("utf-8"), self.caption_separator)
            except UnicodeDecodeError:
                raise SampleError("bad_encoding", f"{name}.txt is not UTF-8") from None
        else:
            value = meta.get("caption", meta.get("text"))
            if isinstance(value, list):
                texts = [t.strip() if isinstance(t, str) else None for t in value]
            else:
                texts = split_captions(value if isinstance(value, str) else None, self.caption_separator)
        dropped: Counter = Counter()
        good, reason, detail = sort_captions(texts, dropped)
        if reason:
            raise SampleError(reason, f"{name}: caption {detail}")
        return good, None if key is None else str(key), dropped

    def _decode(self, index: int, raw: dict, epoch: int) -> dict[str, Any] | Skipped:
        name = f"{raw.get('__url__')}:{raw.get('__key__')}"
        try:
            captions, key, dropped = self._captions(raw, name)
            image = next((raw[e] for e in IMAGE_EXTENSIONS if e in raw), None)
            if image is None:
                raise SampleError("missing_file", f"{name}: no {'/'.join(IMAGE_EXTENSIONS)} member")
            sample = make_sample(
                image, captions, sample_rng(self.seed, epoch, index), self.transform, self.tokenizer,
                index=index, key=key, max_pixels=self.max_pixels, pass_rng=self._pass_rng, name=name,
            )
            return {**sample, "captions_dropped": dropped} if dropped else sample
        except SampleError as error:
            return Skipped(error.reason, index, error.detail, name)

    def __iter__(self) -> Iterator[dict[str, Any] | Skipped]:
        """This rank's and worker's samples (and Skipped markers) for the current epoch."""
        epoch = self.epoch
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role, skip = self._worker_plan(worker, num_workers)
        stream: Iterator = self._raw(self.shards_for(epoch, role, num_workers))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"clipforge-buffer:{self.seed}:{epoch}:{self.rank}:{role}")
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        # Skipping happens before decoding, so fast-forwarding a resumed epoch costs only tar reads.
        for item in islice(stream, skip, None):
            yield item if isinstance(item, Skipped) else self._decode(item[0], item[1], epoch)

