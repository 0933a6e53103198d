"""`create_app(index_dir)`: a FastAPI app that embeds queries and searches one image index.

The model is loaded once per app; embedding requests go through micro-batching queues so that
concurrent callers share forward passes. The app is assembled from named parts: its `ServeState`
(state.py, kept on `app.state.serve`), the endpoints (routes.py), JSON errors and the body limit
(http.py) and upload decoding (uploads.py). Every error is JSON `{"error": message, "status": code}`.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI

from clipforge.errors import ConfigError
from clipforge.serve.batching import MicroBatcher
from clipforge.serve.http import BodyLimit, add_error_handlers
from clipforge.serve.routes import add_routes
from clipforge.serve.state import ServeConfig, ServeState
from clipforge.serve.uploads import decode_upload

__all__ = ["ServeConfig", "ServeState", "create_app", "decode_upload"]
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an upload


def load_state(index_dir: str | Path, config: ServeConfig, encoder: Any = None) -> ServeState:
    """Open the index, load its query model (unless `encoder` is given) and start the micro-batchers."""
    from clipforge.search import ImageIndex, QueryEncoder

    if not 1 <= config.default_k <= config.max_k:
        raise ConfigError(f"default_k must be within 1..{config.max_k}, got {config.default_k}")
    index = ImageIndex.open(index_dir)
    if encoder is None:
        from clipforge.checkpoint.io import refuse_random_weights

        # the index's own model (a checkpoint that moved is named, with what to do), or a bound one of it
        model = index.query_model(config.model or None)
        refuse_random_weights(model.name, config.allow_random_weights)
        # The one model of this app, loaded here, once.
        encoder = QueryEncoder(model.name, config.precision, device=config.device, pretrained=model.pretrained)
    # The device and precision in use ("auto" resolved, or a given encoder's), which /healthz reports.
    config = replace(config, device=str(next(encoder.model.parameters()).device),
                     precision=getattr(encoder, "precision", config.precision))
    wait = config.batch_wait_ms / 1000
    batchers = {"text": MicroBatcher(encoder.embed_texts, config.max_batch, wait, name="text-batcher"),
                "image": MicroBatcher(encoder.embed_images, config.max_batch, wait, name="image-batcher")}
    for modality in getattr(encoder.model, "bound_text", {}):  # a bound model's text towers: their own batches
        embed = functools.partial(encoder.embed_texts, modality=modality)
        batchers[modality] = MicroBatcher(embed, config.max_batch, wait, name=f"{modality}-batcher")
    audio = None
    if getattr(encoder.model, "bound_audio", None):  # recordings arrive as log-mel clips (decoded per request)
        try:
            modality = encoder.audio_modality()
        except ConfigError as error:  # several audio towers, none named "audio": serve the rest
            warnings.warn(f"no POST /search/audio: {error}", stacklevel=2)
        else:
            embed = functools.partial(encoder.embed_audio, modality=modality, preprocessed=True)
            batchers["audio"] = MicroBatcher(embed, config.max_batch, wait, name="audio-batcher")
            audio = replace(encoder.audio_preprocess(modality), max_seconds=config.max_audio_seconds)
    page = resources.files("clipforge.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return ServeState(index, encoder, config, batchers, page, audio)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    for batcher in app.state.serve.batchers.values():  # their worker threads outlive the server otherwise
        batcher.close()


def create_app(index_dir: str | Path, config: ServeConfig | None = None, encoder: Any = None) -> FastAPI:
    """The search app for one index; raises FileNotFoundError / ValueError if index_dir is not an index."""
    state = load_state(index_dir, config or ServeConfig(), encoder)
    app = FastAPI(title="clipforge search", version="1", lifespan=_lifespan,
                  description="Text and image search over a clipforge image index.")
    app.add_middleware(BodyLimit, limit=state.config.max_upload_bytes + MULTIPART_OVERHEAD)
    app.state.serve = state
    # Also under their own names, for callers (`clipforge serve`, tests) that read them from the app.
    app.state.index, app.state.encoder, app.state.config = state.index, state.encoder, state.config
    app.state.batchers = state.batchers
    add_error_handlers(app)
    add_routes(app, state)
    return app
