"""The on-disk index: atomic file writes, the manifest, embedding shards, the SQLite metadata table (all of
the index's SQL is here) and the skip log.

Every write is a temp file + `os.replace`, and every metadata change one SQLite transaction, so a kill at
any point leaves either the old or the new state. Shards are self-describing (embeddings plus each row's
path, size, mtime and caption), which is what lets a killed or distributed run hand its finished shards
to the next run / the merge step: a shard on disk that no table row knows yet is "pending".
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from clipforge.errors import SearchError
from clipforge.io import write_atomic
from clipforge.search.vectors import ArrayVectors, VectorFile, Vectors, write_vectors

FORMAT = "clipforge-index"
VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "metadata.sqlite"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".npz"
VECTORS = "vectors.npy"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted id is never handed out again
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    caption TEXT,
    shard TEXT NOT NULL,
    row INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- captions a CoCa model wrote (`clipforge index --captions`) for images the source gives none; a source caption wins
CREATE TABLE IF NOT EXISTS generated_captions (id INTEGER PRIMARY KEY, caption TEXT NOT NULL);
"""
_IMAGE_COLUMNS = "id, path, size, mtime_ns, caption, shard, row"


class Placement(NamedTuple):
    """An image version (path, size, mtime_ns, caption) and the shard row that holds its embedding."""

    path: str
    size: int
    mtime_ns: int
    caption: str | None
    shard: str
    row: int


class ImageRow(NamedTuple):
    """One row of the `images` table: the image's stable id, then what `Placement` holds."""

    id: int
    path: str
    size: int
    mtime_ns: int
    caption: str | None
    shard: str
    row: int

    @property
    def version(self) -> tuple[int, int]:
        """(size, mtime_ns) of the file as it was embedded."""
        return self.size, self.mtime_ns


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically write manifest.json."""
    write_atomic(index_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """The manifest of an index folder; FileNotFoundError / ValueError say why it is not an index."""
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index folder not found: {index_dir}")
    path = index_dir / MANIFEST
    if not path.is_file():
        hint = " (an interrupted first build? run `clipforge index` again)" if (index_dir / DATABASE).exists() else ""
        raise FileNotFoundError(f"{index_dir} is not a clipforge index: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SearchError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchError(f"{index_dir} is not a clipforge index: {MANIFEST} has no format {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise SearchError(f"{index_dir}: index format version {manifest.get('version')} is not supported "
                         f"(this clipforge reads version {VERSION}); rebuild it with `clipforge index`")
    return manifest


@dataclass
class ShardRows:
    """The rows of one shard: embeddings [n, d] float32 and per-row metadata."""

    embeddings: np.ndarray
    paths: list[str]
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    captions: list[str | None]


def write_shard(path: Path, rows: ShardRows) -> None:
    """Atomically write one shard (.npz, uncompressed: embeddings do not compress)."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, embeddings=rows.embeddings.astype(np.float32, copy=False),
             paths=np.array(rows.paths, dtype=object), sizes=rows.sizes.astype(np.int64),
             mtimes_ns=rows.mtimes_ns.astype(np.int64), captions=np.array(rows.captions, dtype=object))
    write_atomic(path, buffer.getvalue())


def read_shard_embeddings(path: Path) -> np.ndarray:
    """The embeddings of one shard, without unpickling its metadata."""
    with np.load(path, allow_pickle=False) as data:
        return data["embeddings"]


def read_shard(path: Path) -> ShardRows:
    """All of one shard (the metadata arrays are pickled object arrays written by `write_shard`)."""
    with np.load(path, allow_pickle=True) as data:
        return ShardRows(data["embeddings"], [str(p) for p in data["paths"]], data["sizes"], data["mtimes_ns"],
                         [None if c is None else str(c) for c in data["captions"]])


def shard_files(index_dir: Path) -> dict[str, Path]:
    """Shard name -> path of every finished shard file in the index."""
    folder = index_dir / SHARD_DIR
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.glob(f"*{SHARD_SUFFIX}")) if not p.name.startswith(".")}


def connect_readonly(index_dir: Path) -> sqlite3.Connection:
    """A read-only connection (never creates or changes the database); usable from any thread."""
    return sqlite3.connect(f"{(index_dir / DATABASE).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)


def connect(index_dir: Path) -> sqlite3.Connection:
    """Open (creating if needed) the metadata database of an index."""
    index_dir.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (`transaction`), so a batch is all-or-nothing.
    con = sqlite3.connect(index_dir / DATABASE, isolation_level=None, timeout=60)
    con.executescript(_SCHEMA)
    return con


@contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT, rolled back on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def get_meta(con: sqlite3.Connection, key: str) -> str | None:
    """A value of the key/value `meta` table."""
    row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def set_meta(con: sqlite3.Connection, key: str, value: str) -> None:
    """Set a value of the `meta` table (inside the caller's transaction, if any)."""
    con.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value))


def image_rows(con: sqlite3.Connection) -> Iterator[ImageRow]:
    """Every row of `images`, in no particular order."""
    return map(ImageRow._make, con.execute(f"SELECT {_IMAGE_COLUMNS} FROM images"))


def image_row(con: sqlite3.Connection, id: int) -> ImageRow | None:
    """The row of image `id`, or None if no image has it."""
    row = con.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", (int(id),)).fetchone()
    return None if row is None else ImageRow._make(row)


def known_files(con: sqlite3.Connection) -> dict[str, ImageRow]:
    """path -> row of every indexed image."""
    return {row.path: row for row in image_rows(con)}


def upsert_rows(con: sqlite3.Connection, placements: Sequence[Placement]) -> None:
    """Point each image at its shard row (inside the caller's transaction); a known path keeps its id, and loses a
    caption written for its earlier content."""
    _forget_generated(con, [p.path for p in placements])
    con.executemany(
        "INSERT INTO images(path, size, mtime_ns, caption, shard, row) VALUES(?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
        "caption = excluded.caption, shard = excluded.shard, row = excluded.row", placements)


def delete_paths(con: sqlite3.Connection, paths: Iterable[str]) -> None:
    """Forget these images (inside the caller's transaction); their ids are never handed out again."""
    paths = list(paths)
    _forget_generated(con, paths)
    con.executemany("DELETE FROM images WHERE path = ?", [(path,) for path in paths])


def set_captions(con: sqlite3.Connection, captions: dict[int, str | None]) -> None:
    """Set the caption of each image id (inside the caller's transaction)."""
    con.executemany("UPDATE images SET caption = ? WHERE id = ?", [(c, i) for i, c in captions.items()])


def _forget_generated(con: sqlite3.Connection, paths: Sequence[str]) -> None:
    con.executemany("DELETE FROM generated_captions WHERE id IN (SELECT id FROM images WHERE path = ?)",
                    [(path,) for path in paths])


def uncaptioned(con: sqlite3.Connection) -> list[ImageRow]:
    """Images the source gives no caption and no model has captioned yet, by id."""
    return list(map(ImageRow._make, con.execute(
        f"SELECT {_IMAGE_COLUMNS} FROM images WHERE (caption IS NULL OR caption = '') "
        "AND id NOT IN (SELECT id FROM generated_captions) ORDER BY id")))


def set_generated_captions(con: sqlite3.Connection, captions: dict[int, str]) -> None:
    """Store captions a model wrote, by image id (inside the caller's transaction)."""
    con.executemany("INSERT OR REPLACE INTO generated_captions(id, caption) VALUES(?, ?)", list(captions.items()))


def generated_caption(con: sqlite3.Connection, id: int) -> str | None:
    """The caption a model wrote for image `id`; None when there is none (or the index predates them)."""
    try:
        row = con.execute("SELECT caption FROM generated_captions WHERE id = ?", (int(id),)).fetchone()
    except sqlite3.OperationalError:  # an index written before generated captions, opened read-only
        return None
    return None if row is None else row[0]


def registered_shards(con: sqlite3.Connection) -> set[str]:
    """The names of the shards already handed to `images` (a shard file not among them is pending)."""
    return {name for (name,) in con.execute("SELECT name FROM shards")}


def register_shard(con: sqlite3.Connection, name: str, rows: int) -> None:
    """Mark a shard as handed to the table (it is no longer pending)."""
    con.execute("INSERT OR REPLACE INTO shards(name, rows) VALUES(?, ?)", (name, rows))


def bump_generation(con: sqlite3.Connection) -> int:
    """Count one more change of the image table (inside the caller's transaction); the manifest records it."""
    generation = int(get_meta(con, "generation") or 0) + 1
    set_meta(con, "generation", str(generation))
    return generation


def live_rows(con: sqlite3.Connection) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """shard name -> (ids, rows) of the images whose current embedding it holds, ids ascending."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    for rowid, shard, row in con.execute("SELECT id, shard, row FROM images ORDER BY id"):
        ids, rows = out.setdefault(shard, ([], []))
        ids.append(rowid)
        rows.append(row)
    return {s: (np.array(i, dtype=np.int64), np.array(r, dtype=np.int64)) for s, (i, r) in out.items()}


Blocks = Iterator[tuple[np.ndarray, np.ndarray]]  # (row positions, embeddings [len, dim]), as write_vectors takes


def _id_ordered_blocks(index_dir: Path, con: sqlite3.Connection) -> tuple[np.ndarray, Blocks]:
    """(ids ascending, (positions in that order, embeddings) of each shard, one shard read at a time)."""
    live = live_rows(con)
    ids = np.sort(np.concatenate([i for i, _ in live.values()])) if live else np.zeros(0, np.int64)

    def blocks() -> Blocks:
        for shard, (shard_ids, rows) in live.items():
            path = index_dir / SHARD_DIR / shard
            if not path.is_file():
                raise SearchError(f"{index_dir}: shard {shard} is missing; rebuild the index with `clipforge index`")
            yield np.searchsorted(ids, shard_ids), read_shard_embeddings(path)[rows]

    return ids, blocks()


def load_vectors(index_dir: Path, con: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] ascending, embeddings [n, dim] float32) of every live image, gathered from the shards.

    Id order: the same vectors give the same matrix however they are sharded."""
    ids, blocks = _id_ordered_blocks(index_dir, con)
    vectors = np.empty((len(ids), dim), dtype=np.float32)
    for positions, rows in blocks:
        vectors[positions] = rows
    return ids, vectors


def write_vectors_file(index_dir: Path, con: sqlite3.Connection, dim: int) -> np.ndarray:
    """Write every live embedding in id order to `VECTORS`, one shard in memory at a time; returns the ids."""
    ids, blocks = _id_ordered_blocks(index_dir, con)
    write_vectors(index_dir / VECTORS, len(ids), dim, blocks)
    return ids


def live_ids(con: sqlite3.Connection) -> np.ndarray:
    """The ids of every live image, ascending: the row order of `VECTORS` and of `load_vectors`."""
    count = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    return np.fromiter((i for (i,) in con.execute("SELECT id FROM images ORDER BY id")), np.int64, count)


def open_vectors(index_dir: Path, con: sqlite3.Connection,
                 manifest: dict[str, Any]) -> tuple[np.ndarray, Vectors, str | None]:
    """(ids, their vectors in that order, why `VECTORS` could not be used or None).

    A current index gives its `VECTORS` file, read by row; a stale one (see `why_vectors_stale`) the
    shards, gathered in memory: its saved backend may not match them either."""
    ids = live_ids(con)
    stale = why_vectors_stale(index_dir, con, manifest, len(ids))
    if stale is None:
        return ids, VectorFile(index_dir / VECTORS), None
    ids, array = load_vectors(index_dir, con, int(manifest["dim"]))
    return ids, ArrayVectors(array), stale


def why_vectors_stale(index_dir: Path, con: sqlite3.Connection, manifest: dict[str, Any], count: int) -> str | None:
    """Why `VECTORS` and the saved backend may not match the table (so read the shards), or None if they do."""
    if int(get_meta(con, "generation") or 0) != manifest.get("generation"):
        return "changed since its last complete build (interrupted `clipforge index`?)"
    if manifest.get("vectors") != VECTORS or not (index_dir / VECTORS).is_file():
        return f"no {VECTORS} (built by an older clipforge?)"
    rows = VectorFile(index_dir / VECTORS).n
    if rows != count:
        return f"{VECTORS} holds {rows} rows, the table {count}"
    return None


def drop_broken(index_dir: Path, con: sqlite3.Connection) -> None:
    """Forget temp files of a killed run, and rows whose shard file is gone (the diff re-embeds them)."""
    for folder in (index_dir, index_dir / SHARD_DIR):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    files = shard_files(index_dir)
    lost = [name for name in registered_shards(con) if name not in files]
    if lost:
        with transaction(con):
            con.executemany("DELETE FROM generated_captions WHERE id IN (SELECT id FROM images WHERE shard = ?)",
                            [(n,) for n in lost])
            con.executemany("DELETE FROM images WHERE shard = ?", [(n,) for n in lost])
            con.executemany("DELETE FROM shards WHERE name = ?", [(n,) for n in lost])
            bump_generation(con)


def compact(index_dir: Path, con: sqlite3.Connection, shard_size: int, prefix: str) -> None:
    """Delete shards nothing points at; re-pack half-empty shards (and many small ones) into full ones."""
    rows = dict(con.execute("SELECT name, rows FROM shards"))
    live = dict(con.execute("SELECT shard, COUNT(*) FROM images GROUP BY shard"))
    dead = [name for name in rows if not live.get(name)]
    sparse = [name for name in rows if 0 < live.get(name, 0) and live[name] * 2 < rows[name]]
    small = [name for name in rows if 0 < live.get(name, 0) < shard_size // 4 and name not in sparse]
    repack = sparse + (small if len(small) >= 8 else [])  # each incremental run adds one small shard
    moves, cache = [], {}
    for number, start in enumerate(range(0, sum(live[n] for n in repack), shard_size) if repack else []):
        picked = [ImageRow._make(row) for row in con.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE shard IN ({','.join('?' * len(repack))}) "
            "ORDER BY id LIMIT ? OFFSET ?", (*repack, shard_size, start))]
        for shard in {r.shard for r in picked} - set(cache):
            cache[shard] = read_shard_embeddings(index_dir / SHARD_DIR / shard)
        embeddings = np.stack([cache[r.shard][r.row] for r in picked])
        name = f"{prefix}-c{number:05d}{SHARD_SUFFIX}"
        write_shard(index_dir / SHARD_DIR / name, ShardRows(
            embeddings, [r.path for r in picked], np.array([r.size for r in picked]),
            np.array([r.mtime_ns for r in picked]), [r.caption for r in picked]))
        moves.append((name, picked))
    if not dead and not moves:
        return
    with transaction(con):
        for name, picked in moves:
            register_shard(con, name, len(picked))
            con.executemany("UPDATE images SET shard = ?, row = ? WHERE id = ?",
                            [(name, row, r.id) for row, r in enumerate(picked)])
        con.executemany("DELETE FROM shards WHERE name = ?", [(n,) for n in dead + repack])
        bump_generation(con)
    for name in dead + repack:
        (index_dir / SHARD_DIR / name).unlink(missing_ok=True)
