"""Resumable, distributed batch sampler with an optional no-shared-concept-key constraint."""
from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any, Iterator, Sequence

import numpy as np

from clipforge.errors import DataError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of all indices for (seed, epoch), identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def key_constrained_batches(order: Sequence[int], key_ids: Sequence[int], batch_size: int) -> list[list[int]]:
    """Greedy full batches over `order` with no key twice per batch (key id < 0: no key, never clashes).

    A sample whose key is already in the batch being filled waits in a per-key queue; each new
    batch first takes one waiting sample from each of the oldest waiting keys, then continues
    along `order`. Samples that cannot fill a last batch are dropped. Deterministic in its inputs.
    """
    waiting: dict[int, deque[int]] = {}  # insertion order = age of the key's oldest waiting sample
    fresh = iter(order)
    batches: list[list[int]] = []
    while True:
        batch: list[int] = []
        used: set[int] = set()
        for key in list(islice(waiting, batch_size)):
            queue = waiting[key]
            batch.append(queue.popleft())
            used.add(key)
            if not queue:
                del waiting[key]
        for index in fresh:
            key = key_ids[index]
            if key >= 0 and key in used:
                waiting.setdefault(key, deque()).append(index)
                continue
            batch.append(index)
            if key >= 0:
                used.add(key)
            if len(batch) == batch_size:
                break
        if len(batch) < batch_size:
            return batches
        batches.append(batch)


def key_ids_of(keys: Sequence[str | None]) -> list[int]:
    """Small integer per distinct key (-1 for None), for fast set membership."""
    table: dict[str, int] = {}
    return [-1 if k is None else table.setdefault(k, len(table)) for k in keys]


class ResumableBatchSampler:
    """Per-rank batches of a per-epoch permutation, resumable at the exact batch.

    Each step forms one global batch of `world_size * batch_size` indices from the (seed, epoch)
    permutation; rank r takes its contiguous share [r*B, (r+1)*B), so all ranks yield the same
    number of equal-size batches; an incomplete last global batch is dropped. The plan depends
    only on (seed, epoch, global batch size, keys), so a run may resume on a different world size
    with the same global batch.

    With `keys` (a concept key per sample, None for none), global batches hold no two samples
    with the same key: a contrastive loss would otherwise treat a matching caption as a negative.
    They are filled greedily along the permutation, deferring a clashing sample to the next
    batches (see `key_constrained_batches`); a few samples per epoch may be dropped at the end.

    `state_dict()` counts batches yielded by this sampler; a DataLoader with workers prefetches
    ahead of the trainer, so checkpoint `TrainLoader.state_dict()`, which counts delivered ones.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
        keys: Sequence[str | None] | None = None,
    ) -> None:
        """Check the sizes; raise ValueError if not even one global batch fits."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad batch_size={batch_size}, world_size={world_size}, rank={rank}")
        if keys is not None and len(keys) != num_samples:
            raise DataError(f"{len(keys)} keys for {num_samples} samples")
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed = seed
        self.global_batch_size = world_size * batch_size
        self._key_ids = key_ids_of(keys) if keys is not None else None
        distinct = num_samples if self._key_ids is None else (
            len({k for k in self._key_ids if k >= 0}) + sum(k < 0 for k in self._key_ids)
        )
        if distinct < self.global_batch_size:
            what = "samples" if keys is None else "distinct keys"
            raise DataError(f"{distinct} {what} cannot fill one global batch of {self.global_batch_size}")
        self.epoch = 0
        self._done = 0  # batches of this epoch yielded (or restored)
        self._resume_at = 0  # batches to skip at the next pass, set by load_state_dict
        self._cache: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a pending resume point survives only for its own epoch."""
        if epoch != self.epoch:
            self.epoch, self._done, self._resume_at = epoch, 0, 0

    def global_batches(self, epoch: int | None = None) -> np.ndarray:
        """[batches, world_size * batch_size] index plan of an epoch, identical on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            order = epoch_permutation(self.num_samples, self.seed, epoch)
            size = self.global_batch_size
            if self._key_ids is None:
                count = self.num_samples // size
                plan = order[: count * size].reshape(count, size)
            else:
                batches = key_constrained_batches(order.tolist(), self._key_ids, size)
                plan = np.asarray(batches, dtype=np.int64).reshape(len(batches), size)
            self._cache = (epoch, plan)
        return self._cache[1]

    def __len__(self) -> int:
        """Batches per epoch (per rank, equal to the number of global batches)."""
        return len(self.global_batches())

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the current epoch, from the resume point if one was loaded."""
        plan = self.global_batches()
        start, self._resume_at = self._resume_at, 0
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        self._done = start
        for step in range(start, len(plan)):
            self._done = step + 1
            yield plan[step, share].tolist()

    def resume_point(self) -> int:
        """Batches the next pass skips (set by load_state_dict, consumed when a pass starts)."""
        return self._resume_at

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "batches" done in it, "seed", "global_batch_size"}."""
        batches = self._resume_at or self._done
        return {"epoch": self.epoch, "batches": batches, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next pass over epoch `state["epoch"]` starts after `state["batches"]` batches."""
        for name in ("seed", "global_batch_size"):
            if name in state and state[name] != getattr(self, name):
                raise DataError(f"cannot resume: checkpoint has {name}={state[name]}, sampler has "
                                f"{getattr(self, name)}")
        self.epoch, self._done, self._resume_at = int(state["epoch"]), int(state["batches"]), int(state["batches"])
