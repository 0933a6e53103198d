"""`QueryEncoder`: a model and its tokenizer loaded once, turning texts or images into search queries."""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from clipforge.errors import ConfigError


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
        self._tokenizers: dict[str, Any] = {"text": self.tokenizer}  # a bound text tower's, read on first use
        self.precision = resolve_precision(precision, where).precision  # "auto": this machine's choice
        # One call at a time: torch already spreads one batch over every core, and the tokenizer's
        # cache is not meant for concurrent writers.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.model.config.embed_dim)

    def embed_texts(self, texts: Sequence[str], truncate: bool = False, modality: str = "text") -> np.ndarray:
        """[n, d] normalised float32 text embeddings; a text over the context is refused unless `truncate`.
        `modality`: a bound text tower (e.g. "text-ko") reads them, with its own tokenizer."""
        import clipforge
        from clipforge.inference.features import extract_text_features

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            if modality not in self._tokenizers:
                self._tokenizers[modality] = clipforge.get_tokenizer(self.model_name, modality=modality)
            tokenizer = functools.partial(self._tokenizers[modality], truncate=truncate)
            return extract_text_features(self.model, tokenizer, texts, precision=self.precision,
                                         modality=modality).numpy()

    def audio_modality(self) -> str:
        """The model's audio tower: "audio", or its only one; refused when it has none (or several, none "audio")."""
        towers = list(self.model.bound_audio)
        if "audio" in towers or len(towers) == 1:
            return "audio" if "audio" in towers else towers[0]
        if not towers:
            raise ConfigError(f"{self.model_name} has no audio tower: bind one (clipforge bind --modality audio)")
        raise ConfigError(f"{self.model_name} has several audio towers ({', '.join(towers)}) and none named 'audio'")

    def audio_preprocess(self, modality: str | None = None) -> Any:
        """The audio tower's preprocess: a recording (path or bytes) -> its log-mel clip."""
        from clipforge.checkpoint.io import bound_preprocess

        return bound_preprocess(self.model.config, modality or self.audio_modality())

    def embed_audio(self, sources: Sequence[Any], modality: str | None = None,
                    preprocessed: bool = False) -> np.ndarray:
        """[n, d] normalised float32 embeddings of recordings (paths or bytes; `preprocessed`: their log-mel clips,
        from `audio_preprocess`) through a bound audio tower."""
        from clipforge.inference.features import extract_bound_features

        modality = modality or self.audio_modality()
        preprocess = (lambda clip: clip) if preprocessed else self.audio_preprocess(modality)
        with self._lock:
            return extract_bound_features(self.model, sources, preprocess, modality, precision=self.precision).numpy()

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
