"""An index's embeddings and metadata in clip-retrieval's layout, for autofaiss and other engines.

OUT/img_emb/img_emb_{i}.npy ([n, dim], row r) and OUT/metadata/metadata_{i}.parquet (row r: image_path,
caption, id), i = 0, 1, ... in parts of `part_size` rows, so a collection larger than one machine's memory
can be indexed elsewhere part by part.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import SearchError
from clipforge.io import write_atomic
from clipforge.search import store


def export_embeddings(index_dir: str | Path, out_dir: str | Path, part_size: int = 1_000_000,
                      dtype: str = "float16") -> dict[str, Any]:
    """Write the parts; returns {"rows", "parts", "dim", "dtype"}."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SearchError("the parquet metadata needs pyarrow: pip install 'clipforge[export]'") from None
    if dtype not in ("float16", "float32") or part_size < 1:
        raise SearchError(f"dtype must be float16 or float32 and part_size positive, got {dtype!r}, {part_size}")
    index_dir, out = Path(index_dir), Path(out_dir)
    manifest = store.read_manifest(index_dir)
    con = store.connect_readonly(index_dir)
    try:
        ids, vectors, _ = store.open_vectors(index_dir, con, manifest)  # read part by part below
        rows = {row.id: (row.path, row.caption) for row in store.image_rows(con)}
    finally:
        con.close()
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    parts = max(1, -(-len(ids) // part_size))
    for part in range(parts):
        chunk = slice(part * part_size, (part + 1) * part_size)
        array = io.BytesIO()
        np.save(array, vectors.rows(np.arange(len(ids))[chunk]).astype(dtype))
        write_atomic(out / "img_emb" / f"img_emb_{part}.npy", array.getvalue())
        table = pa.table({"image_path": [rows[int(i)][0] for i in ids[chunk]],
                          "caption": [rows[int(i)][1] for i in ids[chunk]], "id": ids[chunk]})
        parquet = pa.BufferOutputStream()
        pq.write_table(table, parquet)
        write_atomic(out / "metadata" / f"metadata_{part}.parquet", parquet.getvalue().to_pybytes())
    return {"rows": int(len(ids)), "parts": parts, "dim": int(manifest["dim"]), "dtype": dtype}
