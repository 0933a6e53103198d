"""Image search: embed a collection once (`build_index`), then query it by text or image (`ImageIndex`).

    stats = build_index("photos/", "photos.index", model="ckpt/")   # again later: only what changed
    index = ImageIndex.open("photos.index")
    encoder = QueryEncoder(index.model, pretrained=index.pretrained)
    scores, ids = index.search(encoder.embed_texts(["a red rocket"]), k=10)
    index.record(int(ids[0, 0]))["path"]

Index format (version 1), one folder:

- `manifest.json`: {"format": "clipforge-index", "version": 1, "model" (absolute checkpoint path, hf-hub:
  name or registry name), "pretrained" (its weights tag, or null), "dim", "count", "generation", "shards",
  "backend": {"kind": "exact" | "faiss-ivf" | "faiss-hnsw", parameters, measured recall@10, timings},
  "source", "precision", "skipped" (counts by reason), "built_at"}. Written last, atomically: it is the
  commit point of a build. `index` and `search --model` refuse any other model (`search/model_ref.py`).
- `skipped.jsonl`: the files this build left out, one {"path", "reason"} a line in path order (empty when
  none); "missing_file" (listed by a CSV, or gone since the listing) is apart from unreadable images
  ("empty_file", "corrupt_image", ...). Rewritten by every build, before the manifest.
- `metadata.sqlite`: table `images(id INTEGER PRIMARY KEY AUTOINCREMENT, path UNIQUE, size, mtime_ns,
  caption, shard, row)`: `id` is the stable id search returns (a changed file keeps its id, a deleted id
  is never reused); `shard`/`row` locate its embedding. Table `shards(name, rows)` lists shards already
  handed to `images`; table `meta` holds model, pretrained, dim and `generation` (bumped by every change of `images`).
- `shards/*.npz`: `embeddings` [n, dim] float32 L2-normalised, plus `paths`, `sizes`, `mtimes_ns`,
  `captions` for each row, so a shard written by a killed run or another rank can be adopted later. A
  shard file not in `shards` is pending; rows that no image points at any more are dropped by re-packing.
- `vectors.npy`: every live embedding [count, dim] float32, in id order (an ordinary `.npy`): what
  search scores exactly, read by row (the exact backend loads it whole). Written by each build from the
  shards; the manifest's `"vectors"` names it.
- `backend.faiss`: the FAISS structure when the backend is one (IVF: the 4-bit PQ candidates and the
  8-bit re-ranking codes, `search/ivf.py`). If `generation` differs from the manifest's (a build was
  killed after changing the table), or the manifest names no `vectors` file (an index built before it
  existed), the index is searched exactly from the shards until the next build.

Image paths are absolute; an image inside a webdataset tar is `/abs/shard.tar#member.jpg`.
"""
from clipforge.search.backend import EXACT_MAX, build_backend, exact_search
from clipforge.search.build import BuildStats, build_index
from clipforge.search.encoder import QueryEncoder
from clipforge.search.index import ImageIndex

__all__ = ["EXACT_MAX", "BuildStats", "ImageIndex", "QueryEncoder", "build_backend", "build_index", "exact_search"]
