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
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clipforge.data.captions import SampleError, decode_image
from clipforge.device import resolve_device
from clipforge.search import store
from clipforge.search.backend import build_backend, save_backend
from clipforge.search.sources import Item, ItemReader, list_source
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


def _embed(items: Sequence[Item], model: Any, preprocess: Callable, batch_size: int, precision: str,
           bar: Any) -> tuple[list[Item], np.ndarray | None, list[tuple[str, str]]]:
    """Embeddings of the readable `items` (which ones, the [n, d] array) and (path, reason) of the others."""
    from clipforge.inference.features import extract_image_features

    reader, failed = ItemReader(), []
    kept: list[Item] = []
    chunks: list[np.ndarray] = []
    pixels: list[torch.Tensor] = []

    def flush() -> None:
        if pixels:
            chunks.append(extract_image_features(model, torch.stack(pixels), batch_size=len(pixels),
                                                 precision=precision).numpy())
            pixels.clear()

    try:
        for item in items:
            bar.update()
            try:
                pixels.append(preprocess(decode_image(reader.read(item.path), name=item.path)))
            except SampleError as error:
                failed.append((item.path, error.reason))
                continue
            except FileNotFoundError:
                failed.append((item.path, "missing_file"))
                continue
            except (OSError, ValueError):  # a tar that went bad since the listing, or the transform refused it
                failed.append((item.path, "corrupt_image"))
                continue
            kept.append(item)
            if len(pixels) == batch_size:
                flush()
        flush()
    finally:
        reader.close()
    return kept, (np.concatenate(chunks) if chunks else None), failed


def _write_shards(index_dir: Path, prefix: str, items: Sequence[Item], model: Any, preprocess: Callable,
                  args: dict[str, Any], on_shard: Callable[[str], None], failed: list[tuple[str, str]]) -> int:
    """Embed `items` shard by shard (each written atomically, then `on_shard(name)`); return the dim."""
    from tqdm import tqdm

    dim = 0
    shard_size = args["shard_size"]
    bar = tqdm(total=len(items), unit="img", desc="embedding", disable=not args["progress"])
    for number, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start : start + shard_size]
        kept, embeddings, chunk_failed = _embed(chunk, model, preprocess, args["batch_size"], args["precision"], bar)
        failed += chunk_failed
        bar.set_postfix(skipped=len(failed), refresh=False)
        if embeddings is None:
            continue
        dim = embeddings.shape[1]
        name = f"{prefix}-{number:05d}{store.SHARD_SUFFIX}"
        store.write_shard(index_dir / store.SHARD_DIR / name, store.ShardRows(
            embeddings, [i.path for i in kept], np.array([i.size for i in kept]),
            np.array([i.mtime_ns for i in kept]), [i.caption for i in kept]))
        on_shard(name)
    bar.close()
    return dim


def _drop_broken(index_dir: Path, con: Any) -> None:
    """Forget temp files of a killed run, and rows whose shard file is gone (the diff re-embeds them)."""
    for folder in (index_dir, index_dir / store.SHARD_DIR):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    files = store.shard_files(index_dir)
    lost = [name for (name,) in con.execute("SELECT name FROM shards") if name not in files]
    if lost:
        with store.transaction(con):
            con.executemany("DELETE FROM images WHERE shard = ?", [(n,) for n in lost])
            con.executemany("DELETE FROM shards WHERE name = ?", [(n,) for n in lost])
            store.bump_generation(con)


def _compact(index_dir: Path, con: Any, shard_size: int, prefix: str) -> None:
    """Delete shards nothing points at; re-pack half-empty shards (and many small ones) into full ones."""
    rows = dict(con.execute("SELECT name, rows FROM shards"))
    live = dict(con.execute("SELECT shard, COUNT(*) FROM images GROUP BY shard"))
    dead = [name for name in rows if not live.get(name)]
    sparse = [name for name in rows if 0 < live.get(name, 0) and live[name] * 2 < rows[name]]
    small = [name for name in rows if 0 < live.get(name, 0) < shard_size // 4 and name not in sparse]
    repack = sparse + (small if len(small) >= 8 else [])  # each incremental run adds one small shard
    moves, cache = [], {}
    for number, start in enumerate(range(0, sum(live[n] for n in repack), shard_size) if repack else []):
        picked = con.execute(
            f"SELECT id, path, size, mtime_ns, caption, shard, row FROM images WHERE shard IN "
            f"({','.join('?' * len(repack))}) ORDER BY id LIMIT ? OFFSET ?", (*repack, shard_size, start)).fetchall()
        for shard in {r[5] for r in picked} - set(cache):
            cache[shard] = store.read_shard_embeddings(index_dir / store.SHARD_DIR / shard)
        embeddings = np.stack([cache[r[5]][r[6]] for r in picked])
        name = f"{prefix}-c{number:05d}{store.SHARD_SUFFIX}"
        store.write_shard(index_dir / store.SHARD_DIR / name, store.ShardRows(
            embeddings, [r[1] for r in picked], np.array([r[2] for r in picked]), np.array([r[3] for r in picked]),
            [r[4] for r in picked]))
        moves.append((name, picked))
    if not dead and not moves:
        return
    with store.transaction(con):
        for name, picked in moves:
            store.register_shard(con, name, len(picked))
            con.executemany("UPDATE images SET shard = ?, row = ? WHERE id = ?",
                            [(name, row, r[0]) for row, r in enumerate(picked)])
        con.executemany("DELETE FROM shards WHERE name = ?", [(n,) for n in dead + repack])
        store.bump_generation(con)
    for name in dead + repack:
        (index_dir / store.SHARD_DIR / name).unlink(missing_ok=True)


def _dist() -> tuple[int, int]:
    """(rank, world size): joins the process group under torchrun, (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from clipforge.distributed import init_distributed

    info = init_distributed()
    return info.rank, info.world_size


def _on_rank0(rank: int, world: int, step: Callable[[], Any]) -> Any:
    """Run `step` on rank 0 and hand every rank its result; its error is raised on every rank (none hangs)."""
    result: Any = None
    if rank == 0:
        try:
            result = step()
        except Exception as error:
            if world > 1:
                _broadcast(error)
            raise
    if world <= 1:
        return result
    result = _broadcast(result)
    if isinstance(result, Exception):
        raise RuntimeError(f"rank 0 failed: {result}")
    return result


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _finish(index_dir: Path, con: Any, stats: BuildStats, args: dict[str, Any], source: str) -> None:
    """Build the search backend over every live vector and write the manifest (the index's commit point)."""
    dim = int(store.get_meta(con, "dim") or 0)
    ids, vectors = store.load_vectors(index_dir, con, dim)
    backend = build_backend(vectors, args["backend"], args["target_recall"])
    if backend.index is not None:
        save_backend(backend, index_dir / BACKEND_FILE)
    else:
        (index_dir / BACKEND_FILE).unlink(missing_ok=True)
    stats.total, stats.backend = len(ids), backend.describe()
    store.write_manifest(index_dir, {
        "format": store.FORMAT, "version": store.VERSION, "model": store.get_meta(con, "model"),
        "pretrained": store.get_meta(con, "pretrained") or None, "dim": dim,
        "count": len(ids), "generation": int(store.get_meta(con, "generation") or 0),
        "shards": len(store.shard_files(index_dir)), "backend": backend.describe(), "source": source,
        "precision": args["precision"], "skipped": stats.skipped,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _prepare(index_dir: Path, con: Any, source: Any, name: str, pretrained: str | None, separator: str,
             stats: BuildStats) -> tuple[dict[str, Item], list[Item]]:
    """(listing, items to embed): check the model, resume finished shards, apply the diff."""
    recorded = store.get_meta(con, "model")
    recorded_tag = store.get_meta(con, "pretrained") or None
    if recorded is not None and (recorded, recorded_tag) != (name, pretrained):
        built = recorded + (f" (pretrained {recorded_tag})" if recorded_tag else "")
        raise SearchError(f"{index_dir} was built with model {built}, not {name}"
                         f"{f' (pretrained {pretrained})' if pretrained else ''}: use the same model or a new index folder")
    if recorded is None:
        if pretrained is None:
            _warn_if_random(name)
        with store.transaction(con):
            store.set_meta(con, "model", name)
            if pretrained is not None:
                store.set_meta(con, "pretrained", pretrained)
    items, missing = list_source(source, separator)
    if missing:
        stats.skipped["missing_file"] = len(missing)
    scan = {item.path: item for item in items}
    _drop_broken(index_dir, con)
    registered = {n for (n,) in con.execute("SELECT name FROM shards")}
    _ingest(index_dir, con, [n for n in store.shard_files(index_dir) if n not in registered], scan, stats)
    stats.resumed = stats.added + stats.updated
    todo = _diff(con, scan, stats)
    stats.unchanged -= stats.resumed  # the diff sees the adopted rows as indexed already
    return scan, todo


def _lock(index_dir: Path) -> Any:
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = open(index_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IndexLocked(f"{index_dir}: another `clipforge index` is updating this index") from None
    return lock


def build_index(source: str | Path | Sequence[str | Path], out_dir: str | Path, model: str | Path,
                batch_size: int = 64, progress: bool = True, *, backend: str = "auto", shard_size: int = 4096,
                precision: str = "fp32", target_recall: float = 0.97, separator: str = "|",
                device: str = "cpu", pretrained: str | None = None) -> BuildStats:
    """Create or update the index in `out_dir` of an image folder, caption CSV or webdataset shard(s).

    `model` is any name clipforge.load takes (with `pretrained`, an architecture and its weights tag)."""
    import clipforge

    if batch_size < 1 or shard_size < 1:
        raise SearchError("batch_size and shard_size must be positive")
    start = time.perf_counter()
    index_dir, name = Path(out_dir), model_id(model)
    pretrained = model_id(pretrained) if pretrained is not None and Path(pretrained).is_file() else pretrained
    args = {"batch_size": batch_size, "progress": progress, "backend": backend, "shard_size": shard_size,
            "precision": precision, "target_recall": target_recall}
    rank, world = _dist()  # under torchrun the out_dir must be on a file system every rank sees
    stats, state = BuildStats(), {}

    def prepare() -> tuple[list[Item], str]:
        state["fresh"] = not index_dir.exists() or not any(index_dir.iterdir())  # nothing of the user's to keep
        state["lock"] = _lock(index_dir)
        state["con"] = store.connect(index_dir)
        state["scan"], todo = _prepare(index_dir, state["con"], source, name, pretrained, separator, stats)
        return todo, f"{time.time_ns():x}"

    def on_shard(shard: str) -> None:
        if world == 1:  # in one process each shard is final at once; under torchrun rank 0 merges at the end
            _ingest(index_dir, state["con"], [shard], state["scan"], stats)

    def merge(failed: list[tuple[str, str]], dim: int) -> BuildStats:
        con = state["con"]
        if world > 1:
            _ingest(index_dir, con, [n for n in store.shard_files(index_dir) if n.startswith(f"{run_id}-")],
                    state["scan"], stats)
        stats.skipped = dict(Counter(stats.skipped) + Counter(reason for _, reason in failed))
        if failed:  # a file that changed into an unreadable one: its old embedding no longer stands for it
            with store.transaction(con):
                con.executemany("DELETE FROM images WHERE path = ?", [(path,) for path, _ in failed])
                store.bump_generation(con)
        if dim and store.get_meta(con, "dim") is None:
            with store.transaction(con):
                store.set_meta(con, "dim", str(dim))
        if store.get_meta(con, "dim") is None:
            state["discard"] = state["fresh"]  # no half-made index left to be mistaken for an interrupted build
            raise SearchError(f"{source}: no readable images to index (skipped: {stats.skipped or 'none'})")
        _compact(index_dir, con, shard_size, f"{run_id}-r0")
        _finish(index_dir, con, stats, args, str(source))
        stats.seconds = round(time.perf_counter() - start, 2)
        return stats

    try:
        todo, run_id = _on_rank0(rank, world, prepare)
        mine = todo[rank::world]
        loaded, preprocess = (clipforge.load(name, resolve_device(device), pretrained=pretrained) if mine
                              else (None, None))
        failed: list[tuple[str, str]] = []
        dim = _write_shards(index_dir, f"{run_id}-r{rank}", mine, loaded, preprocess,
                            {**args, "progress": progress and rank == 0}, on_shard, failed)
        if world > 1:
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, (failed, dim))
            failed = [entry for rank_failed, _ in gathered for entry in rank_failed]
            dim = max(d for _, d in gathered)
        return _on_rank0(rank, world, lambda: merge(failed, dim))
    finally:
        if "con" in state:
            state["con"].close()
        if "lock" in state:
            state["lock"].close()
        if state.get("discard"):
            shutil.rmtree(index_dir, ignore_errors=True)
