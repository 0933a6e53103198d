"""A micro-batching queue: concurrent requests for embeddings share one forward pass.

One worker thread takes whatever is queued (waiting at most `max_wait_s` after the first item for more
to arrive, up to `max_batch`), runs the batch function once, and hands each caller its own row. Under
load this turns N single-item forward passes into N / max_batch batched ones; when idle, a lone
request waits at most `max_wait_s` extra.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Generic, TypeVar

import numpy as np

from clipforge.errors import ConfigError

T = TypeVar("T")
_STOP = object()


class MicroBatcher(Generic[T]):
    """Collects items from many threads or coroutines into batches for one `fn(list[T]) -> ndarray`."""

    def __init__(self, fn: Callable[[list[T]], np.ndarray], max_batch: int = 32, max_wait_s: float = 0.005,
                 name: str = "batcher") -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches = 0  # forward passes run, for tests and /healthz
        self.items = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """Queue one item; the future resolves to its row of the batch output (or the batch's error)."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put((item, future))
        return future

    async def embed(self, item: T) -> np.ndarray:
        """Await one item's row from a coroutine without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued work and stop the worker thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _collect(self) -> tuple[list[tuple[T, Future]], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            if not batch:
                continue
            # A caller that gave up (cancelled future) should not cost a forward pass.
            batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[T, Future]]) -> None:
        try:
            out = self.fn([item for item, _ in batch])
        except Exception as error:
            if len(batch) == 1:  # the waiter sees its own failure instead of hanging
                batch[0][1].set_exception(error)
                return
            # One bad item (an over-long text, say) must not fail the requests it happened to share a
            # batch with: retry one at a time so only its own caller gets the error.
            for entry in batch:
                self._run_batch([entry])
            return
        self.batches += 1
        self.items += len(batch)
        for row, (_, future) in zip(out, batch):
            future.set_result(row)
