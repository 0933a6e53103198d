"""`ImageIndex`: a read-only view of a built index (the search structure in memory, exact vectors read by row
from `vectors.npy`, metadata looked up in SQLite)."""
from __future__ import annotations

import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import SearchError
from clipforge.search import store
from clipforge.search.backend import Backend, build_backend, load_backend
from clipforge.search.build import BACKEND_FILE
from clipforge.search.model_ref import ModelRef, check_model


class ImageIndex:
    """Search an index written by `build_index`: `search` by embedding, `record` for an id's metadata."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], ids: np.ndarray, backend: Backend) -> None:
        self.path, self.manifest, self.ids, self._backend = index_dir, manifest, ids, backend
        self._local = threading.local()  # a sqlite3 connection may only be used by the thread that made it

    @classmethod
    def open(cls, index_dir: str | Path) -> "ImageIndex":
        """Load an index folder; FileNotFoundError / ValueError say clearly why it is not one."""
        index_dir = Path(index_dir)
        manifest = store.read_manifest(index_dir)
        if not (index_dir / store.DATABASE).is_file():
            raise SearchError(f"{index_dir}: the index has no {store.DATABASE}; rebuild it with `clipforge index`")
        con = store.connect_readonly(index_dir)
        try:
            ids, vectors, stale = store.open_vectors(index_dir, con, manifest)
        except sqlite3.DatabaseError as error:
            raise SearchError(f"{index_dir}: unreadable {store.DATABASE}: {error}") from None
        finally:
            con.close()
        if stale:
            # The table and shards are consistent, the saved vectors and FAISS structure may not be:
            # search exactly until the next `clipforge index` finishes.
            warnings.warn(f"{index_dir}: {stale}; searching exactly until `clipforge index` is re-run", stacklevel=2)
            return cls(index_dir, manifest, ids, build_backend(vectors.load(), "exact"))
        backend = load_backend(manifest.get("backend", {"kind": "exact"}), index_dir / BACKEND_FILE, vectors)
        return cls(index_dir, manifest, ids, backend)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.manifest["dim"])

    @property
    def model(self) -> str:
        """The model (checkpoint path or registry name) the index was built with."""
        return str(self.manifest["model"])

    @property
    def pretrained(self) -> str | None:
        """The weights tag the index was built with (None: `model` names its weights itself)."""
        return self.manifest.get("pretrained")

    def query_model(self, model: str | Path | None = None, pretrained: str | None = None) -> ModelRef:
        """The model to embed queries with: the index's own, or `model` (with `pretrained`) once checked to be it.

        A recorded checkpoint path that no longer exists can neither be loaded nor compared: without `model`
        that is refused, saying so; `model` is then taken as the checkpoint's new location, with a warning."""
        recorded = ModelRef(self.model, self.pretrained)
        gone = recorded.missing_files()
        if model is None and gone:
            raise SearchError(f"{self.path} was built with {gone[0]} (the path recorded in its {store.MANIFEST}), "
                              "which no longer exists: if the checkpoint moved, pass its new location with --model "
                              "(search), or re-run `clipforge index` with --model NEW_PATH (serve reads the index's)")
        if model is None and pretrained is None:
            return recorded
        asked = ModelRef.of(self.model if model is None else model, pretrained)
        check_model(self.path, recorded, asked)
        return asked

    @property
    def backend(self) -> dict[str, Any]:
        """{"kind": "exact" | "faiss-ivf" | "faiss-hnsw", **parameters and measured recall}."""
        return self._backend.describe()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [q, min(k, len)], best first, for normalised float32 queries [q, dim]."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchError(f"queries must be [q, {self.dim}], got {list(queries.shape)}")
        if k < 1:
            raise SearchError(f"k must be positive, got {k}")
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
        scores, positions = self._backend.search(queries, k)
        # FAISS marks "fewer than k found" with -1; those slots get id -1 and score -inf.
        ids = np.where(positions >= 0, self.ids[np.clip(positions, 0, None)], -1)
        return np.where(positions >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def record(self, id: int) -> dict[str, Any]:
        """{"id", "path", "size", "mtime", "caption", "caption_generated"} of an indexed image (the source's caption,
        else one a model wrote with `clipforge index --captions`); KeyError if the id is unknown."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = store.connect_readonly(self.path)
        row = store.image_row(con, id)
        if row is None:
            raise KeyError(id)
        generated = None if row.caption else store.generated_caption(con, row.id)
        return {"id": row.id, "path": row.path, "size": row.size, "mtime": row.mtime_ns / 1e9,
                "caption": generated or row.caption, "caption_generated": generated is not None}
