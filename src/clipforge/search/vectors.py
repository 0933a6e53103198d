"""Embedding matrices that need not fit in memory: a `.npy` file read in chunks or by row, or an array.

A search structure over 10M x 512 vectors cannot hold them as float32 (20 GiB), but it needs them three
ways: one pass in chunks to build, a sample to train on, and a few rows per query to score exactly.
`VectorFile` does all three with plain reads (no memory map, so the process's resident memory stays
the size of a chunk; the page cache is the kernel's to manage). The file is an ordinary `.npy`, so
`np.load(path, mmap_mode="r")` opens it too. `ArrayVectors` gives an in-memory array the same interface.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from clipforge.errors import SearchError
from clipforge.inference.similarity import chunked_topk
from clipforge.io import atomic_path

CHUNK_ROWS = 65_536  # 128 MiB of float32 at d=512


class Vectors(Protocol):
    """Row-addressable float32 vectors [n, dim]."""

    n: int
    dim: int

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block [<= rows, dim]) in order, covering every row once."""

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions` (any order, repeats allowed), as a new [len, dim] array."""

    def load(self) -> np.ndarray:
        """The whole matrix in memory."""


class ArrayVectors:
    """An in-memory float32 matrix as `Vectors`."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.n, self.dim = self.array.shape

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) views of the array."""
        for start in range(0, self.n, rows):
            yield start, self.array[start : start + rows]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Fancy indexing (a copy)."""
        return self.array[np.asarray(positions, dtype=np.int64)]

    def load(self) -> np.ndarray:
        """The array itself (no copy)."""
        return self.array


class VectorFile:
    """A float32 C-order `.npy` matrix on disk, read with `pread` (thread-safe: no shared file position)."""

    _fd = -1

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(handle)
            except ValueError as error:
                raise SearchError(f"{self.path}: not a .npy file: {error}") from None
            self.offset = handle.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise SearchError(f"{self.path}: expected a C-order float32 [n, dim] matrix, got {dtype} {shape}")
        self.n, self.dim = int(shape[0]), int(shape[1])
        self._row_bytes = 4 * self.dim
        expected = self.offset + self.n * self._row_bytes
        if self.path.stat().st_size != expected:
            raise SearchError(f"{self.path}: {self.path.stat().st_size} bytes, expected {expected} (truncated?)")
        self._fd = os.open(self.path, os.O_RDONLY)

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) read sequentially into fresh arrays."""
        for start in range(0, self.n, rows):
            count = min(rows, self.n - start)
            yield start, self._read(start, count)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """One read per run of consecutive positions, in file order, then put back in the asked order."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        order = np.argsort(positions, kind="stable")
        ascending = positions[order]
        if len(ascending) and (ascending[0] < 0 or ascending[-1] >= self.n):
            raise SearchError(f"{self.path}: row positions must be in [0, {self.n})")
        rows = np.empty((len(ascending), self.dim), np.float32)
        for first, end in _runs(ascending):  # a repeated position starts a new run: read again, still right
            self._read_into(rows[first:end], int(ascending[first]))
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def load(self) -> np.ndarray:
        """The whole matrix in memory."""
        return self._read(0, self.n)

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, self.dim), np.float32)
        if out.size:
            self._read_into(out, start)
        return out

    def _read_into(self, out: np.ndarray, start: int) -> None:
        view, offset, done = memoryview(out).cast("B"), self.offset + start * self._row_bytes, 0
        while done < len(view):  # pread may return fewer bytes than asked
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise SearchError(f"{self.path}: ended early (changed while reading?)")
            done += got

    def close(self) -> None:
        """Release the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def write_vectors(path: str | Path, n: int, dim: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write an [n, dim] float32 `.npy` atomically from (positions, rows) blocks that together fill every row."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, dim)}
    written = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            offset = handle.tell()
            handle.truncate(offset + 4 * n * dim)
            for positions, rows in blocks:
                written += _write_runs(handle.fileno(), offset, np.asarray(positions, np.int64),
                                       np.ascontiguousarray(rows, dtype=np.float32))
        if written != n:
            raise SearchError(f"{path}: {written} rows written, {n} expected")


def _runs(positions: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, end) index ranges of `positions` (ascending) that hold consecutive values."""
    bounds = [0, *(np.flatnonzero(np.diff(positions) != 1) + 1).tolist(), len(positions)]
    return ((first, end) for first, end in zip(bounds[:-1], bounds[1:]) if end > first)


def _write_runs(fd: int, offset: int, positions: np.ndarray, rows: np.ndarray) -> int:
    """pwrite `rows` at `positions` (ascending), one call per run of consecutive positions."""
    row_bytes = rows.shape[1] * 4
    for first, end in _runs(positions):
        data, done = memoryview(rows[first:end]).cast("B"), 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + int(positions[first]) * row_bytes + done)
    return len(positions)


def exact_topk(vectors: Vectors, queries: np.ndarray, k: int,
               chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) [q, k] of the k largest inner products over every row, in one pass of chunks."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(q), 0), -torch.inf)
    best_positions = torch.zeros((len(q), 0), dtype=torch.int64)
    for start, block in vectors.chunks(chunk_rows):
        keys = torch.from_numpy(block)
        local = chunked_topk(q, keys, min(k, len(block)))
        scores = torch.einsum("qd,qkd->qk", q, keys[local])
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_positions = torch.cat([best_positions, local + start], dim=1)
        keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1).indices
        best_scores, best_positions = best_scores.gather(1, keep), best_positions.gather(1, keep)
    order = torch.sort(best_scores, dim=1, descending=True, stable=True).indices
    return best_scores.gather(1, order).numpy(), best_positions.gather(1, order).numpy()
