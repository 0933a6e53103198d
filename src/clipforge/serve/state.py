"""What one search app serves with: its settings (`ServeConfig`) and what it loads once (`ServeState`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipforge.serve.batching import MicroBatcher


@dataclass
class ServeConfig:
    """Request limits and batching settings of one app."""

    max_k: int = 100
    default_k: int = 12
    max_query_chars: int = 500
    max_texts: int = 32  # per /embed/text request
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 50_000_000  # decoded size: a small PNG can still inflate to gigabytes
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    allow_random_weights: bool = False  # an index built with a registry name (no weights) answers at random
    device: str = "cpu"  # where the query model runs (resolve_device's spec; an app's config: the device in use)
    precision: str = "fp32"  # query embedding: "fp32", "bf16" or "auto" (an app's config: the resolved one)
    # the query model: "" for the index's own; a checkpoint with its image tower bit for bit (the CLIP with towers
    # bound to it, `clipforge bind`) adds its text towers' `modality` on /search and POST /search/audio
    model: str = ""
    max_audio_seconds: float = 30.0  # an uploaded recording's longest duration (longer: 413)


@dataclass
class ServeState:
    """The index, query encoder, micro-batchers ("text", "image", one per bound tower: "text-ko", "audio"), limits
    and web page of one app."""

    index: Any  # clipforge.search.ImageIndex
    encoder: Any  # clipforge.search.QueryEncoder, or anything with its embed_* methods and model
    config: ServeConfig
    batchers: dict[str, MicroBatcher]
    page: str
    audio_preprocess: Any = None  # a bound audio tower's: an uploaded recording -> its log-mel clip

    @property
    def texts(self) -> MicroBatcher:
        """The batcher of text queries."""
        return self.batchers["text"]

    @property
    def images(self) -> MicroBatcher:
        """The batcher of image queries."""
        return self.batchers["image"]
