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

from clipforge.data.images import SampleError, decode_image
from clipforge.device import resolve_device
from clipforge.search import ranks, store
from clipforge.search.backend import build_backend, save_backend
from clipforge.search.sources import Item, ItemReader, list_source
from clipforge.search.vectors import VectorFile
from clipforge.errors import IndexLocked, SearchError

BACKEND_FILE = "backend.faiss"
LOCK_FILE = ".lock"


@dataclass
class BuildStats:
    """What one `build_index` run did; `skipped` counts unreadable images by reason."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
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
    device: str
    workers: int


@dataclass
class _Run:
    """One `build_index` run on one rank: what it was asked, and what it holds open or has found so far."""

    index_dir: Path
    source: Any
    model: str
    pretrained: str | None
    separator: str
    settings: _Settings
    started: float
    rank: int = 0
    world: int = 1
    stats: BuildStats = field(default_factory=BuildStats)
    run_id: str = ""  # prefixes this run's shard names; rank 0 picks it
    fresh: bool = False  # the folder held nothing of the user's before this run
    lock: IO[str] | None = None
    con: sqlite3.Connection | None = None
    scan: dict[str, Item] = field(default_factory=dict)  # the source's listing, by path
    discard: bool = False  # remove the folder on the way out: this run made it and nothing came of it


def model_id(model: str | Path) -> str:
    """How the index records a model: an absolute path for a checkpoint, else the registry name."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else str(model)


def _warn_if_random(model: str) -> None:
    import clipforge

    if model in clipforge.list_models() and not Path(model).exists():
        warnings.warn(f"{model!r} is a registry architecture with random weights: every load differs, so "
                      "queries will not match the index; index with a checkpoint file or folder", stacklevel=3)


def _ingest(index_dir: Path, con: Any, names: Sequence[str], scan: dict[str, Item], stats: BuildStats) -> None:
    """Hand finished shards to the table in one transaction, rows in path order (so ids follow paths).

    A row is taken only while the listing still shows its file as it was embedded (size and mtime) and
    the table does not already hold that version; anything else is left to the diff to re-embed.
    """
    if not names:
        return
    known = store.known_files(con)
    sizes: dict[str, int] = {}
    entries = []
    for name in names:
        rows = store.read_shard(index_dir / store.SHARD_DIR / name)
        sizes[name] = len(rows.paths)
        for row, path in enumerate(rows.paths):
            item, old = scan.get(path), known.get(path)
            if item is None or (item.size, item.mtime_ns) != (int(rows.sizes[row]), int(rows.mtimes_ns[row])):
                continue
            if old is None or (old[1], old[2]) != (item.size, item.mtime_ns):
                entries.append((path, item.size, item.mtime_ns, item.caption, name, row))
    entries.sort()
    with store.transaction(con):
        for name, size in sizes.items():  # registered even when nothing was taken: never read again
            store.register_shard(con, name, size)
        store.upsert_rows(con, entries)
        if entries:
            store.bump_generation(con)
    updated = sum(entry[0] in known for entry in entries)
    stats.updated += updated
    stats.added += len(entries) - updated


def _diff(con: Any, scan: dict[str, Item], stats: BuildStats) -> list[Item]:
    """Apply deletions and caption-only changes; return the items to embed (new or changed, path order)."""
    known = store.known_files(con)
    removed = [path for path in known if path not in scan]
    todo, recaptioned = [], []
    for path, item in scan.items():
        old = known.get(path)
        if old is None or (old[1], old[2]) != (item.size, item.mtime_ns):
            todo.append(item)
        elif old[3] != item.caption:
            recaptioned.append((item.caption, old[0]))
        else:
            stats.unchanged += 1
    if removed or recaptioned:
        with store.transaction(con):
            con.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in removed])
            con.executemany("UPDATE images SET caption = ? WHERE id = ?", recaptioned)
            store.bump_generation(con)
    stats.removed += len(removed)
    stats.updated += len(recaptioned)
    return sorted(todo, key=lambda item: item.path)


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
           bar: Any) -> tuple[list[Item], np.ndarray | None, list[tuple[str, str]]]:
    """Embeddings of the readable `items` (which ones, the [n, d] array) and (path, reason) of the others."""
    from clipforge.inference.features import extract_image_features

    kept, chunks, pixels, failed = [], [], [], []

    def flush() -> None:
        if pixels:
            chunks.append(extract_image_features(model, torch.stack(pixels), batch_size=len(pixels),
                                                 precision=settings.precision).numpy())
            pixels.clear()

    pin = str(settings.device).startswith("cuda")
    for i, image, reason in _decoded(items, preprocess, settings.batch_size, settings.workers, pin):
        bar.update()
        if image is None:
            failed.append((items[i].path, reason))
            continue
        kept.append(items[i])
        pixels.append(image)
        if len(pixels) == settings.batch_size:  # full batches of readable images, as the model's best shape
            flush()
    flush()
    return kept, (np.concatenate(chunks) if chunks else None), failed


def _write_shards(run: _Run, items: Sequence[Item], model: Any, preprocess: Callable,
                  failed: list[tuple[str, str]]) -> int:
    """Embed this rank's `items` shard by shard (each written atomically, then handed on); return the dim."""
    from tqdm import tqdm

    dim = 0
    settings = run.settings
    bar = tqdm(total=len(items), unit="img", desc="embedding", disable=not (settings.progress and run.rank == 0))
    for number, start in enumerate(range(0, len(items), settings.shard_size)):
        chunk = items[start : start + settings.shard_size]
        kept, embeddings, chunk_failed = _embed(chunk, model, preprocess, settings, bar)
        failed += chunk_failed
        bar.set_postfix(skipped=len(failed), refresh=False)
        if embeddings is None:
            continue
        dim = embeddings.shape[1]
        name = f"{run.run_id}-r{run.rank}-{number:05d}{store.SHARD_SUFFIX}"
        store.write_shard(run.index_dir / store.SHARD_DIR / name, store.ShardRows(
            embeddings, [i.path for i in kept], np.array([i.size for i in kept]),
            np.array([i.mtime_ns for i in kept]), [i.caption for i in kept]))
        if run.world == 1:  # in one process each shard is final at once; under torchrun rank 0 merges at the end
            _ingest(run.index_dir, run.con, [name], run.scan, run.stats)
    bar.close()
    return dim


def _finish(run: _Run) -> None:
    """Build the search backend over every live vector and write the manifest (the index's commit point)."""
    index_dir, con, stats, settings = run.index_dir, run.con, run.stats, run.settings
    dim = int(store.get_meta(con, "dim") or 0)
    ids = store.write_vectors_file(index_dir, con, dim)
    vectors = VectorFile(index_dir / store.VECTORS)
    backend = build_backend(vectors, settings.backend, settings.target_recall)
    if backend.index is not None:
        save_backend(backend, index_dir / BACKEND_FILE)
    else:
        (index_dir / BACKEND_FILE).unlink(missing_ok=True)
    stats.total, stats.backend = len(ids), backend.describe()
    store.write_manifest(index_dir, {
        "format": store.FORMAT, "version": store.VERSION, "model": store.get_meta(con, "model"),
        "pretrained": store.get_meta(con, "pretrained") or None, "dim": dim,
        "count": len(ids), "generation": int(store.get_meta(con, "generation") or 0),
        "shards": len(store.shard_files(index_dir)), "vectors": store.VECTORS, "backend": backend.describe(),
        "source": str(run.source),
        "precision": settings.precision, "skipped": stats.skipped,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _check_model(run: _Run) -> None:
    """Refuse a folder indexed with another model; record the model in a new one."""
    con, name, pretrained = run.con, run.model, run.pretrained
    recorded = store.get_meta(con, "model")
    recorded_tag = store.get_meta(con, "pretrained") or None
    if recorded is not None and (recorded, recorded_tag) != (name, pretrained):
        built = recorded + (f" (pretrained {recorded_tag})" if recorded_tag else "")
        raise SearchError(f"{run.index_dir} was built with model {built}, not {name}"
                         f"{f' (pretrained {pretrained})' if pretrained else ''}: use the same model or a new index folder")
    if recorded is None:
        if pretrained is None:
            _warn_if_random(name)
        with store.transaction(con):
            store.set_meta(con, "model", name)
            if pretrained is not None:
                store.set_meta(con, "pretrained", pretrained)


def _open(run: _Run) -> tuple[list[Item], str]:
    """Rank 0's first step: lock and open the index, list the source, resume finished shards, apply the diff.

    Returns the items to embed and the run id.
    """
    index_dir, stats = run.index_dir, run.stats
    run.fresh = not index_dir.exists() or not any(index_dir.iterdir())
    run.lock = _lock(index_dir)
    run.con = store.connect(index_dir)
    _check_model(run)
    items, missing = list_source(run.source, run.separator)
    if missing:
        stats.skipped["missing_file"] = len(missing)
    run.scan = {item.path: item for item in items}
    store.drop_broken(index_dir, run.con)
    registered = {n for (n,) in run.con.execute("SELECT name FROM shards")}
    _ingest(index_dir, run.con, [n for n in store.shard_files(index_dir) if n not in registered], run.scan, stats)
    stats.resumed = stats.added + stats.updated
    todo = _diff(run.con, run.scan, stats)
    stats.unchanged -= stats.resumed  # the diff sees the adopted rows as indexed already
    return todo, f"{time.time_ns():x}"


def _lock(index_dir: Path) -> Any:
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = open(index_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IndexLocked(f"{index_dir}: another `clipforge index` is updating this index") from None
    return lock


def _embed_share(run: _Run, todo: Sequence[Item]) -> tuple[list[tuple[str, str]], int]:
    """Every rank's middle step: embed its slice of `todo`; returns (path, reason) of all ranks' failures and the dim."""
    import clipforge

    mine = todo[run.rank :: run.world]
    loaded, preprocess = (clipforge.load(run.model, resolve_device(run.settings.device), pretrained=run.pretrained)
                          if mine else (None, None))
    failed: list[tuple[str, str]] = []
    dim = _write_shards(run, mine, loaded, preprocess, failed)
    gathered = ranks.gather(run.world, (failed, dim))
    return [entry for rank_failed, _ in gathered for entry in rank_failed], max(d for _, d in gathered)


def _merge(run: _Run, failed: list[tuple[str, str]], dim: int) -> BuildStats:
    """Rank 0's last step: take every rank's shards, forget failed files, re-pack, build the backend and manifest."""
    con, stats = run.con, run.stats
    if run.world > 1:
        _ingest(run.index_dir, con, [n for n in store.shard_files(run.index_dir) if n.startswith(f"{run.run_id}-")],
                run.scan, stats)
    stats.skipped = dict(Counter(stats.skipped) + Counter(reason for _, reason in failed))
    if failed:  # a file that changed into an unreadable one: its old embedding no longer stands for it
        with store.transaction(con):
            con.executemany("DELETE FROM images WHERE path = ?", [(path,) for path, _ in failed])
            store.bump_generation(con)
    if dim and store.get_meta(con, "dim") is None:
        with store.transaction(con):
            store.set_meta(con, "dim", str(dim))
    if store.get_meta(con, "dim") is None:
        run.discard = run.fresh  # no half-made index left to be mistaken for an interrupted build
        raise SearchError(f"{run.source}: no readable images to index (skipped: {stats.skipped or 'none'})")
    store.compact(run.index_dir, con, run.settings.shard_size, f"{run.run_id}-r0")
    _finish(run)
    stats.seconds = round(time.perf_counter() - run.started, 2)
    return stats


def _close(run: _Run) -> None:
    """Release what the run holds; remove the folder if the run made it and nothing came of it."""
    if run.con is not None:
        run.con.close()
    if run.lock is not None:
        run.lock.close()
    if run.discard:
        shutil.rmtree(run.index_dir, ignore_errors=True)


def build_index(source: str | Path | Sequence[str | Path], out_dir: str | Path, model: str | Path,
                batch_size: int = 64, progress: bool = True, *, backend: str = "auto", shard_size: int = 4096,
                precision: str = "fp32", target_recall: float = 0.97, separator: str = "|",
                device: str = "cpu", pretrained: str | None = None, workers: int = 2) -> BuildStats:
    """Create or update the index in `out_dir` of an image folder, caption CSV or webdataset shard(s).

    `model` is any name clipforge.load takes (with `pretrained`, an architecture and its weights tag);
    `workers` processes decode images while the model embeds (0: decode in this process)."""
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise SearchError("batch_size and shard_size must be positive, workers at least 0")
    started = time.perf_counter()
    pretrained = model_id(pretrained) if pretrained is not None and Path(pretrained).is_file() else pretrained
    settings = _Settings(batch_size, progress, backend, shard_size, precision, target_recall, device, workers)
    rank, world = ranks.rank_and_world()  # under torchrun the out_dir must be on a file system every rank sees
    run = _Run(Path(out_dir), source, model_id(model), pretrained, separator, settings, started, rank, world)
    try:
        todo, run.run_id = ranks.on_rank0(rank, world, lambda: _open(run))
        failed, dim = _embed_share(run, todo)
        return ranks.on_rank0(rank, world, lambda: _merge(run, failed, dim))
    finally:
        _close(run)
