"""`QueryEncoder`: a model and its tokenizer loaded once, turning texts or images into search queries."""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image


class QueryEncoder:
    """Normalised float32 query embeddings of texts or PIL images; safe to share between threads."""

    def __init__(self, model: str | Path, precision: str = "fp32", device: str = "cpu",
                 pretrained: str | None = None) -> None:
        import clipforge
        from clipforge.device import resolve_device
        from clipforge.precision import resolve_precision

        self.model_name = str(model)
        where = resolve_device(device)
        self.model, self.preprocess = clipforge.load(model, where, pretrained=pretrained)
        self.tokenizer = clipforge.get_tokenizer(model, context_length=self.model.context_length)
        self.precision = resolve_precision(precision, where).precision  # "auto": this machine's choice
        # One call at a time: torch already spreads one batch over every core, and the tokenizer's
        # cache is not meant for concurrent writers.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.model.config.embed_dim)

    def embed_texts(self, texts: Sequence[str], truncate: bool = False) -> np.ndarray:
        """[n, d] normalised float32 text embeddings; a text over the context is refused unless `truncate`."""
        from clipforge.inference.features import extract_text_features

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokenizer = functools.partial(self.tokenizer, truncate=truncate)
        with self._lock:
            return extract_text_features(self.model, tokenizer, texts, precision=self.precision).numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[n, d] normalised float32 image embeddings (preprocessed as the index's images were)."""
        from clipforge.inference.features import extract_image_features

        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            return extract_image_features(self.model, images, self.preprocess, precision=self.precision).numpy()

    def caption(self, images: Sequence[Image.Image], **settings: Any) -> list[str]:
        """Captions of PIL images from a CoCa model (settings: `CLIP.generate`'s), preprocessed as embeddings are."""
        import torch

        from clipforge.model.generation import caption_texts

        pixels = torch.stack([self.preprocess(image) for image in images])
        with self._lock, torch.no_grad():
            return caption_texts(self.model, pixels, self.tokenizer, **settings)
