"""`build_index`: embed a folder / caption CSV / webdataset into an index, incrementally and resumably.

One run: list the source (stat only); hand any shard an interrupted run finished to the table
("resume"); diff the listing against the table (new, changed, deleted, caption-only changes); embed the
new and changed images into shards, each handed to the table as soon as it is written; re-pack sparse
shards; build the search backend; write the manifest. Under `torchrun` every rank embeds its slice of the
work list into shards of its own and rank 0 merges them in path order, so ids (and the index) equal a
single process's.
"""
from __future__ import annotations

import fcntl
import shutil
import sqlite3
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from clipforge.data.images import SampleError, SkippedFile, decode_image, skipped_by_reason, write_skip_log
from clipforge.device import resolve_device
from clipforge.distributed import gather_objects
from clipforge.errors import IndexLocked, SearchError
from clipforge.precision import resolve_precision
from clipforge.search import ranks, store
from clipforge.search.backend import build_backend, save_backend
from clipforge.search.model_ref import ModelRef, check_model
from clipforge.search.sources import Item, ItemReader, list_source
from clipforge.search.vectors import VectorFile

BACKEND_FILE = "backend.faiss"
LOCK_FILE = ".lock"


@dataclass
class BuildStats:
    """What one `build_index` run did; `skipped` counts unreadable images by reason, `skipped_files` names them."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths, sorted
    total: int = 0
    resumed: int = 0  # of added + updated: taken from shards that an interrupted run had finished
    backend: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Settings:
    """How a build embeds, stores and searches (the options of `build_index` besides source, folder, model)."""

    batch_size: int
    progress: bool
    backend: str
    shard_size: int
    precision: str
    target_recall: float
    device: torch.device
    workers: int


def _warn_if_random(model: str) -> None:
    import clipforge

    if model in clipforge.list_models() and not Path(model).exists():
        warnings.warn(f"{model!r} is a registry architecture with random weights: every load differs, so "
                      "queries will not match the index; index with a checkpoint file or folder", stacklevel=6)


class _DecodedItems(torch.utils.data.Dataset):
    """Item i -> (i, pixels or None, skip reason or None): decoding and preprocessing, in DataLoader workers."""

    def __init__(self, items: Sequence[Item], preprocess: Callable) -> None:
        self.items, self.preprocess = items, preprocess
        self.reader: ItemReader | None = None  # made in each process that reads: open tar handles are not shared

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        self.reader = self.reader or ItemReader()
        path = self.items[i].path
        try:
            return i, self.preprocess(decode_image(self.reader.read(path), name=path)), None
        except SampleError as error:
            return i, None, error.reason
        except FileNotFoundError:
            return i, None, "missing_file"
        except (OSError, ValueError):  # a tar that went bad since the listing, or the transform refused it
            return i, None, "corrupt_image"


def _decoded(items: Sequence[Item], preprocess: Callable, batch_size: int, workers: int,
             pin: bool) -> Iterator[tuple[int, torch.Tensor | None, str | None]]:
    """Every item decoded, in order; `workers` processes decode the next batches while the model runs."""
    dataset = _DecodedItems(items, preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list,
                                         pin_memory=pin, prefetch_factor=4 if workers else None)
    try:
        for batch in loader:
            yield from batch
    finally:
        if dataset.reader is not None:  # workers=0: this process read the files
            dataset.reader.close()


def _embed(items: Sequence[Item], model: Any, preprocess: Callable, settings: _Settings,
           bar: Any) -> tuple[list[Item], np.ndarray | None, list[SkippedFile]]:
    """Embeddings of the readable `items` (which ones, the [n, d] array) and the skips of the others."""
    from clipforge.inference.features import extract_image_features

    kept, chunks, pixels, failed = [], [], [], []

    def flush() -> None:
        if pixels:
            chunks.append(extract_image_features(model, torch.stack(pixels), batch_size=len(pixels),
                                                 precision=settings.precision).numpy())
            pixels.clear()

    pin = settings.device.type == "cuda"
    for i, image, reason in _decoded(items, preprocess, settings.batch_size, settings.workers, pin):
        bar.update()
        if image is None:
            failed.append(SkippedFile(items[i].path, reason))
            continue
        kept.append(items[i])
        pixels.append(image)
        if len(pixels) == settings.batch_size:  # full batches of readable images, as the model's best shape
            flush()
    flush()
    return kept, (np.concatenate(chunks) if chunks else None), failed


def _by_reason(skips: Sequence[SkippedFile]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """(reason -> count, reasons in the order they first occur; reason -> sorted paths)."""
    return dict(Counter(skip.reason for skip in skips)), skipped_by_reason(skips)


def lock_index(index_dir: Path) -> IO[str]:
    """The index's exclusive lock (one writer at a time), or IndexLocked at once."""
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = open(index_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IndexLocked(f"{index_dir}: another `clipforge index` is updating this index") from None
    return lock


class IndexBuild:
    """One `build_index` run on one rank; on rank 0 it holds the index's lock and metadata connection and counts.

    `open` (rank 0) lists the source, adopts the shards an interrupted run finished and applies the diff;
    `embed` (every rank) embeds its slice of the work list into shards of its own; `merge` (rank 0) takes
    every rank's shards, forgets failed files, re-packs, builds the backend and writes the manifest.
    """

    def __init__(self, index_dir: Path, source: Any, model: ModelRef, separator: str, settings: _Settings,
                 rank: int = 0, world: int = 1) -> None:
        self.index_dir, self.source, self.model, self.separator = index_dir, source, model, separator
        self.settings, self.rank, self.world = settings, rank, world
        self.stats = BuildStats()
        self.run_id = ""  # prefixes this run's shard names; rank 0 picks it, `embed` hands it to every rank
        self._started = time.perf_counter()
        self._lock: IO[str] | None = None
        self._con: sqlite3.Connection | None = None
        self._scan: dict[str, Item] = {}  # the source's listing, by path
        self._adopted: set[str] = set()  # paths taken from an interrupted run's shards (counted when taken)
        self._skips: list[SkippedFile] = []
        self._fresh = False  # the folder held nothing of the user's before this run
        self._discard = False  # remove the folder on the way out: this run made it and nothing came of it

    def __enter__(self) -> "IndexBuild":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> tuple[list[Item], str]:
        """Rank 0's first step: lock and open the index, list the source, adopt finished shards, apply the diff.

        Returns the items to embed (new or changed, in path order) and the run id."""
        self._fresh = not self.index_dir.exists() or not any(self.index_dir.iterdir())
        self._lock = lock_index(self.index_dir)
        self._con = store.connect(self.index_dir)
        self._check_model()
        items, missing = list_source(self.source, self.separator)
        self._skips = [SkippedFile(path, "missing_file") for path in missing]
        self._scan = {item.path: item for item in items}
        store.drop_broken(self.index_dir, self._con)
        registered = store.registered_shards(self._con)
        adopted = self._ingest([n for n in store.shard_files(self.index_dir) if n not in registered])
        self.stats.resumed, self._adopted = len(adopted), {placement.path for placement in adopted}
        self.run_id = f"{time.time_ns():x}"
        return self._diff(), self.run_id

    def embed(self, todo: Sequence[Item], run_id: str) -> tuple[list[SkippedFile], int]:
        """Every rank's middle step: embed this rank's slice of `todo`; returns every rank's skips and the dim."""
        import clipforge

        self.run_id = run_id
        mine = todo[self.rank :: self.world]
        model, preprocess = (clipforge.load(self.model.name, self.settings.device, pretrained=self.model.pretrained)
                             if mine else (None, None))
        failed, dim = self._write_shards(mine, model, preprocess)
        gathered = gather_objects(self.world, (failed, dim))
        return [skip for rank_failed, _ in gathered for skip in rank_failed], max(d for _, d in gathered)

    def merge(self, failed: Sequence[SkippedFile], dim: int) -> BuildStats:
        """Rank 0's last step: take every rank's shards, forget failed files, re-pack, build backend and manifest."""
        con, stats = self._con, self.stats
        if self.world > 1:
            self._ingest([n for n in store.shard_files(self.index_dir) if n.startswith(f"{self.run_id}-")])
        self._skips += failed
        stats.skipped, stats.skipped_files = _by_reason(self._skips)
        if failed:  # a file that changed into an unreadable one: its old embedding no longer stands for it
            with store.transaction(con):
                store.delete_paths(con, [skip.path for skip in failed])
                store.bump_generation(con)
        if dim and store.get_meta(con, "dim") is None:
            with store.transaction(con):
                store.set_meta(con, "dim", str(dim))
        if store.get_meta(con, "dim") is None:
            self._discard = self._fresh  # no half-made index left to be mistaken for an interrupted build
            raise SearchError(f"{self.source}: no readable images to index (skipped: {stats.skipped or 'none'})")
        store.compact(self.index_dir, con, self.settings.shard_size, f"{self.run_id}-r0")
        self._finish()
        stats.seconds = round(time.perf_counter() - self._started, 2)
        return stats

    def close(self) -> None:
        """Release what the run holds; remove the folder if the run made it and nothing came of it."""
        if self._con is not None:
            self._con.close()
        if self._lock is not None:
            self._lock.close()
        if self._discard:
            shutil.rmtree(self.index_dir, ignore_errors=True)

    def _check_model(self) -> None:
        """Refuse a folder indexed with another model; record the model in a new one."""
        con = self._con
        recorded = store.get_meta(con, "model")
        if recorded is not None:
            # A moved checkpoint is recorded at its new location, so search and serve find it from now on.
            if not check_model(self.index_dir, ModelRef(recorded, store.get_meta(con, "pretrained") or None),
                               self.model):
                return
        elif self.model.pretrained is None:
            _warn_if_random(self.model.name)
        with store.transaction(con):
            store.set_meta(con, "model", self.model.name)
            store.set_meta(con, "pretrained", self.model.pretrained or "")

    def _ingest(self, names: Sequence[str]) -> list[store.Placement]:
        """Hand finished shards to the table in one transaction, rows in path order (so ids follow paths).

        A row is taken only while the listing still shows its file as it was embedded (size and mtime) and
        the table does not already hold that version; anything else is left to the diff to re-embed. Each
        row taken is counted as added or updated; returns them.
        """
        if not names:
            return []
        known = store.known_files(self._con)
        sizes: dict[str, int] = {}
        taken = []
        for name in names:
            shard = store.read_shard(self.index_dir / store.SHARD_DIR / name)
            sizes[name] = len(shard.paths)
            for row, path in enumerate(shard.paths):
                item, old = self._scan.get(path), known.get(path)
                if item is None or item.version != (int(shard.sizes[row]), int(shard.mtimes_ns[row])):
                    continue
                if old is None or old.version != item.version:
                    taken.append(store.Placement(path, item.size, item.mtime_ns, item.caption, name, row))
        taken.sort()
        with store.transaction(self._con):
            for name, size in sizes.items():  # registered even when nothing was taken: never read again
                store.register_shard(self._con, name, size)
            store.upsert_rows(self._con, taken)
            if taken:
                store.bump_generation(self._con)
        updated = sum(placement.path in known for placement in taken)
        self.stats.updated += updated
        self.stats.added += len(taken) - updated
        return taken

    def _diff(self) -> list[Item]:
        """Apply deletions and caption-only changes; return the items to embed (new or changed, path order)."""
        known = store.known_files(self._con)
        removed = [path for path in known if path not in self._scan]
        todo, captions = [], {}
        for path, item in self._scan.items():
            old = known.get(path)
            if old is None or old.version != item.version:
                todo.append(item)
            elif old.caption != item.caption:
                captions[old.id] = item.caption
                self.stats.updated += 1
            elif path not in self._adopted:  # an adopted row was counted when it was taken
                self.stats.unchanged += 1
        if removed or captions:
            with store.transaction(self._con):
                store.delete_paths(self._con, removed)
                store.set_captions(self._con, captions)
                store.bump_generation(self._con)
        self.stats.removed += len(removed)
        return sorted(todo, key=lambda item: item.path)

    def _write_shards(self, items: Sequence[Item], model: Any, preprocess: Callable) -> tuple[list[SkippedFile], int]:
        """Embed this rank's `items` shard by shard (each written atomically, then handed on); (skips, dim)."""
        from tqdm import tqdm

        dim, failed, settings = 0, [], self.settings
        bar = tqdm(total=len(items), unit="img", desc="embedding", disable=not (settings.progress and self.rank == 0))
        for number, start in enumerate(range(0, len(items), settings.shard_size)):
            kept, embeddings, chunk_failed = _embed(items[start : start + settings.shard_size], model, preprocess,
                                                    settings, bar)
            failed += chunk_failed
            bar.set_postfix(skipped=len(failed), refresh=False)
            if embeddings is None:
                continue
            dim = embeddings.shape[1]
            name = f"{self.run_id}-r{self.rank}-{number:05d}{store.SHARD_SUFFIX}"
            store.write_shard(self.index_dir / store.SHARD_DIR / name, store.ShardRows(
                embeddings, [i.path for i in kept], np.array([i.size for i in kept]),
                np.array([i.mtime_ns for i in kept]), [i.caption for i in kept]))
            if self.world == 1:  # in one process each shard is final at once; under torchrun rank 0 merges at the end
                self._ingest([name])
        bar.close()
        return failed, dim

    def _finish(self) -> None:
        """Build the search backend over every live vector, write the skip log, then the manifest (the commit point)."""
        index_dir, con, stats, settings = self.index_dir, self._con, self.stats, self.settings
        dim = int(store.get_meta(con, "dim") or 0)
        ids = store.write_vectors_file(index_dir, con, dim)
        backend = build_backend(VectorFile(index_dir / store.VECTORS), settings.backend, settings.target_recall)
        if backend.index is not None:
            save_backend(backend, index_dir / BACKEND_FILE)
        else:
            (index_dir / BACKEND_FILE).unlink(missing_ok=True)
        stats.total, stats.backend = len(ids), backend.describe()
        write_skip_log(index_dir, self._skips)
        store.write_manifest(index_dir, {
            "format": store.FORMAT, "version": store.VERSION, "model": store.get_meta(con, "model"),
            "pretrained": store.get_meta(con, "pretrained") or None, "dim": dim,
            "count": len(ids), "generation": int(store.get_meta(con, "generation") or 0),
            "shards": len(store.shard_files(index_dir)), "vectors": store.VECTORS, "backend": backend.describe(),
            "source": str(self.source),
            "precision": settings.precision, "skipped": stats.skipped,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })


def build_index(source: str | Path | Sequence[str | Path], out_dir: str | Path, model: str | Path,
                batch_size: int = 64, progress: bool = True, *, backend: str = "auto", shard_size: int = 4096,
                precision: str = "fp32", target_recall: float = 0.97, separator: str = "|",
                device: str = "cpu", pretrained: str | None = None, workers: int = 2) -> BuildStats:
    """Create or update the index in `out_dir` of an image folder, caption CSV or webdataset shard(s).

    `model` is any name clipforge.load takes (with `pretrained`, an architecture and its weights tag);
    `workers` processes decode images while the model embeds (0: decode in this process). Unreadable
    images are skipped: `BuildStats.skipped_files` and the index's `skipped.jsonl` name them."""
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise SearchError("batch_size and shard_size must be positive, workers at least 0")
    rank, world = ranks.rank_and_world()  # under torchrun the out_dir must be on a file system every rank sees
    # Resolved before anything else, after torchrun picked each rank's GPU: an up-to-date index embeds
    # nothing, and a device that is not there is refused all the same.
    torch_device = resolve_device(device)
    # The manifest records what "auto" chose; every rank embeds with rank 0's choice (a probe may time differently).
    chosen = ranks.on_rank0(rank, world, lambda: resolve_precision(precision, torch_device).precision)
    settings = _Settings(batch_size, progress, backend, shard_size, chosen, target_recall, torch_device, workers)
    with IndexBuild(Path(out_dir), source, ModelRef.of(model, pretrained), separator, settings, rank, world) as build:
        todo, run_id = ranks.on_rank0(rank, world, build.open)
        failed, dim = build.embed(todo, run_id)
        return ranks.on_rank0(rank, world, lambda: build.merge(failed, dim))
