"""`clipforge index --captions`: a CoCa model writes captions for indexed images their source gave none (an image
folder, CSV rows with an empty caption). They are stored beside the index's metadata, batch by batch, so a killed
run keeps what it wrote and the next one goes on; a source caption always wins, and an image whose file changed
loses the caption written for its earlier content. Search results and the web page show them, marked generated."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clipforge.data.labelled import decode_all
from clipforge.errors import SearchError
from clipforge.model.generation import caption_texts
from clipforge.search import store
from clipforge.search.build import lock_index


@dataclass
class CaptionStats:
    """What a captioning pass did: captions written, and images it could not read by path (webdataset members)."""

    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def caption_index(index_dir: str | Path, model: torch.nn.Module, tokenizer: Any, preprocess: Callable,
                  num_beams: int = 3, max_length: int = 30, batch_size: int = 32,
                  progress: bool = False) -> CaptionStats:
    """Write captions for every indexed image without one; returns how many, and the skips by reason. Holds the
    index's lock: it refuses to run beside a `clipforge index` updating the same index."""
    if getattr(model, "text_decoder", None) is None:
        raise SearchError("--captions needs a model with a captioning decoder (CoCa, e.g. coca_ViT-B-32)")
    if num_beams < 1:
        raise SearchError(f"caption beams must be >= 1, got {num_beams}")
    lock = lock_index(Path(index_dir))  # no other `clipforge index` changes a file's row while its caption is written
    con = store.connect(Path(index_dir))
    try:
        return _caption_rows(con, model, tokenizer, preprocess, num_beams, max_length, batch_size, progress)
    finally:
        con.close()
        lock.close()


def _caption_rows(con: Any, model: torch.nn.Module, tokenizer: Any, preprocess: Callable, num_beams: int,
                  max_length: int, batch_size: int, progress: bool) -> CaptionStats:
    from tqdm import tqdm  # local, as the index build's: only a captioning pass needs it

    rows, stats = store.uncaptioned(con), CaptionStats()
    settings = {"strategy": "beam" if num_beams > 1 else "greedy", "num_beams": num_beams,
                "max_length": min(max_length, model.context_length)}
    model.eval()
    with tqdm(total=len(rows), unit="img", desc="captioning", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            skipped: list = []
            pixels, keep = decode_all([row.path for row in batch], preprocess, skipped)
            for skip in skipped:
                stats.skipped[skip.reason] = stats.skipped.get(skip.reason, 0) + 1
            if len(pixels):
                with torch.no_grad():
                    written = caption_texts(model, pixels, tokenizer, **settings)
                kept = [row for row, ok in zip(batch, keep) if ok]
                captions = {row.id: text.strip() for row, text in zip(kept, written) if text.strip()}
                if len(captions) < len(kept):  # nothing worth storing: tried again next time
                    stats.skipped["empty caption"] = stats.skipped.get("empty caption", 0) + len(kept) - len(captions)
                with store.transaction(con):
                    store.set_generated_captions(con, captions)
                stats.written += len(captions)
            bar.update(len(batch))
    return stats
