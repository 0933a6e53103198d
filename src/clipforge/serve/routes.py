"""The endpoints of the search API, declared per app by `add_routes`.

An app's limits (`k` up to `max_k`, queries up to `max_query_chars`, the texts of /embed/text) are part of its
endpoints' parameter types, so FastAPI enforces them and the OpenAPI spec lists them; the `ServeState` they
serve with comes from the app that received the request, through the `State` dependency. URLs carry index
ids, never paths, and `/images/{id}` serves only files the index recorded.
"""
# No `from __future__ import annotations`: the parameter types carrying an app's limits are locals of the
# function that declares its endpoints, and FastAPI reads those only as evaluated annotations.
import asyncio
import mimetypes
import sqlite3
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from PIL import Image

from clipforge.errors import TextTooLong
from clipforge.serve.batching import MicroBatcher
from clipforge.serve.schemas import (
    CaptionResponse,
    EmbedImageResponse,
    EmbedTextResponse,
    HealthResponse,
    SearchResponse,
    error_texts,
    errors,
    text_request_model,
)
from clipforge.serve.state import ServeConfig, ServeState
from clipforge.serve.uploads import read_audio_upload, read_upload


async def serve_state(request: Request) -> ServeState:
    """The `ServeState` of the app that received the request (async: FastAPI would run a plain def in a thread)."""
    return request.app.state.serve


State = Annotated[ServeState, Depends(serve_state)]


def _read_tar_member(path: str) -> bytes | None:
    """Bytes of an image inside a webdataset shard (`/abs/shard.tar#member`), or None if gone."""
    from clipforge.search.sources import ItemReader

    reader = ItemReader()
    try:
        data = reader.read(path)
        return data if isinstance(data, bytes) else None
    except (OSError, KeyError, tarfile.TarError):
        return None
    finally:
        reader.close()


def _took_ms(start: float) -> float:
    return round(1000 * (time.perf_counter() - start), 3)


async def _embed(state: ServeState, batcher: MicroBatcher, item: Any) -> np.ndarray:
    try:
        return await batcher.embed(item)
    except TextTooLong:  # the caller's to fix
        raise HTTPException(422, f"invalid request: the text is longer than the model's context of "
                                 f"{state.encoder.model.context_length} tokens") from None


def _lookup(state: ServeState, image_id: int) -> dict[str, Any]:
    try:
        return state.index.record(image_id)
    except OverflowError:  # an id beyond SQLite's 64-bit integers cannot be in the index
        raise KeyError(image_id) from None
    except sqlite3.Error as error:  # the index folder was removed or replaced under a running server
        raise HTTPException(503, f"the index metadata is unavailable ({error}): restart the server") from None


async def _search(state: ServeState, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
    scores, ids = await anyio.to_thread.run_sync(state.index.search, vector[None].astype(np.float32), k)
    results = []
    # Approximate backends pad with id -1 (score -inf) when they find fewer than k: not results.
    found = [(score, image_id) for score, image_id in zip(scores[0].tolist(), ids[0].tolist()) if image_id >= 0]
    for rank, (score, image_id) in enumerate(found, 1):
        record = _lookup(state, int(image_id))
        # The file name only: absolute paths on the server are none of the client's business.
        name = record["path"].rsplit("#", 1)[-1].replace("\\", "/").rsplit("/", 1)[-1]
        results.append({"rank": rank, "id": int(image_id), "score": round(float(score), 6),
                        "url": f"/images/{int(image_id)}", "name": name, "caption": record.get("caption"),
                        "caption_generated": bool(record.get("caption_generated"))})
    return results


async def _upload(state: ServeState, file: UploadFile) -> Image.Image:
    return await read_upload(file, state.config.max_upload_bytes, state.config.max_image_pixels)


def add_routes(app: FastAPI, state: ServeState) -> None:
    """Declare the search API's endpoints on `app`, their parameters limited by `state.config`."""
    texts = error_texts({**asdict(state.config), "context_length": state.encoder.model.context_length})

    async def home(state: State) -> HTMLResponse:
        return HTMLResponse(state.page)

    async def healthz(state: State) -> dict[str, Any]:  # liveness, the index served, the limits, the batching
        index = state.index
        return {"status": "ok", "images": len(index), "dim": index.dim, "model": Path(str(index.model)).name,
                # the query model by name only: server paths are none of the client's business
                "limits": {**asdict(state.config), "model": Path(state.config.model).name},
                "batches": {n: {"batches": b.batches, "items": b.items} for n, b in state.batchers.items()}}

    app.add_api_route("/", home, response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/healthz", healthz, summary="Liveness and index facts", response_model=HealthResponse)
    text_modalities = tuple(name for name in state.batchers if name == "text" or name.startswith("text-"))
    _add_query_routes(app, state.config, texts, text_modalities)
    if state.audio_preprocess is not None:  # a bound model with an audio tower: search by recording
        _add_audio_route(app, state.config, texts)
    _add_image_route(app, texts)
    if getattr(state.encoder.model, "text_decoder", None) is not None:  # a CoCa index: it can write captions
        _add_caption_route(app, state.encoder.model.context_length, texts)


def _add_query_routes(app: FastAPI, cfg: ServeConfig, texts: dict[int, str], text_modalities: tuple[str, ...]) -> None:
    """/embed/text, /embed/image, /search and /search/image, with `cfg`'s limits in their parameter types;
    `text_modalities`: the text towers a query may name ("text", and a bound model's, e.g. "text-ko")."""
    query = Annotated[str, Query(min_length=1, max_length=cfg.max_query_chars, description="text query")]
    modality_of = Annotated[Literal[text_modalities], Query(  # type: ignore[valid-type]
        description="the text tower that reads q: the CLIP's own ('text') or a bound one (`clipforge bind`)")]
    top_k = Annotated[int, Query(ge=1, le=cfg.max_k, description=f"results to return (1..{cfg.max_k})")]
    text_request = text_request_model(cfg.max_texts, cfg.max_query_chars)

    async def embed_text(state: State, body: text_request) -> dict[str, Any]:  # each text batched with others'
        start = time.perf_counter()
        rows = await asyncio.gather(*(_embed(state, state.texts, text) for text in body.texts))
        return {"dim": state.index.dim, "embeddings": np.asarray(rows, dtype=np.float32).tolist(),
                "took_ms": _took_ms(start)}

    async def embed_image(state: State, file: UploadFile = File(description="an image file")) -> dict[str, Any]:
        start = time.perf_counter()
        row = await _embed(state, state.images, await _upload(state, file))
        return {"dim": state.index.dim, "embedding": row.astype(np.float32).tolist(), "took_ms": _took_ms(start)}

    async def search_text(state: State, q: query, k: top_k = cfg.default_k,
                          modality: modality_of = "text") -> dict[str, Any]:
        start = time.perf_counter()
        if not q.strip():
            raise HTTPException(422, "invalid request: q: the query is blank")
        results = await _search(state, await _embed(state, state.batchers[modality], q), k)
        return {"query": q, "k": k, "results": results, "took_ms": _took_ms(start)}

    async def search_image(state: State, file: UploadFile = File(description="an image file"), *,
                           k: top_k = cfg.default_k) -> dict[str, Any]:
        start = time.perf_counter()
        results = await _search(state, await _embed(state, state.images, await _upload(state, file)), k)
        return {"k": k, "results": results, "took_ms": _took_ms(start)}

    app.add_api_route("/embed/text", embed_text, methods=["POST"], summary="Embed texts (L2-normalised)",
                      response_model=EmbedTextResponse, responses=errors(texts, 400, 413, 422))
    app.add_api_route("/embed/image", embed_image, methods=["POST"],
                      summary="Embed an uploaded image (L2-normalised)", response_model=EmbedImageResponse,
                      responses=errors(texts, 400, 413, 415, 422))
    app.add_api_route("/search", search_text, summary="Search the index with a text query",
                      response_model=SearchResponse, responses=errors(texts, 422, 503))
    app.add_api_route("/search/image", search_image, methods=["POST"],
                      summary="Search the index with an uploaded image", response_model=SearchResponse,
                      responses=errors(texts, 400, 413, 415, 422, 503))


def _add_audio_route(app: FastAPI, cfg: ServeConfig, texts: dict[int, str]) -> None:
    """POST /search/audio: a recording through the bound audio tower, against the index's images."""
    top_k = Annotated[int, Query(ge=1, le=cfg.max_k, description=f"results to return (1..{cfg.max_k})")]

    async def search_audio(state: State, file: UploadFile = File(description="a recording (WAV, FLAC, Ogg, ...)"),
                           *, k: top_k = cfg.default_k) -> dict[str, Any]:
        start = time.perf_counter()
        clip = await read_audio_upload(file, state.config.max_upload_bytes, state.audio_preprocess)
        results = await _search(state, await _embed(state, state.batchers["audio"], clip), k)
        return {"k": k, "results": results, "took_ms": _took_ms(start)}

    app.add_api_route("/search/audio", search_audio, methods=["POST"],
                      summary="Search the index with an uploaded recording (a bound audio tower)",
                      response_model=SearchResponse, responses=errors(texts, 400, 413, 415, 422, 503))


def _add_image_route(app: FastAPI, texts: dict[int, str]) -> None:
    """/images/{image_id}: an indexed image by id, a file on disk or a member of a webdataset shard."""
    async def image(state: State, image_id: int) -> Response:
        try:
            record = _lookup(state, image_id)
        except KeyError:
            raise HTTPException(404, f"no image with id {image_id} in this index") from None
        path = str(record["path"])
        media = mimetypes.guess_type(path.rsplit("#", 1)[-1])[0] or "application/octet-stream"
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=600"}
        if not media.startswith("image/"):  # the index lists images only; anything else is not served
            raise HTTPException(404, f"image {image_id} has no image file type")
        if ".tar#" in path:
            data = await anyio.to_thread.run_sync(_read_tar_member, path)
            if data is None:
                raise HTTPException(404, f"image {image_id} is indexed but its shard member is gone")
            return Response(data, media_type=media, headers=headers)
        if not Path(path).is_file():
            raise HTTPException(404, f"image {image_id} is indexed but its file is gone")
        return FileResponse(path, media_type=media, headers=headers)

    app.add_api_route("/images/{image_id}", image, summary="An indexed image, by id", response_class=Response,
                      responses={200: {"content": {"image/*": {}}, "description": "the image file"},
                                 **errors(texts, 404, 422, 503)})


def _add_caption_route(app: FastAPI, context_length: int, texts: dict[int, str]) -> None:
    """/caption: a caption for an uploaded image (only where the index's model has CoCa's decoder)."""
    beams = Annotated[int, Query(ge=1, le=8, description="beam search: beams (1..8)")]
    default_length = min(30, context_length)
    length = Annotated[int, Query(ge=2, le=context_length,
                                  description=f"ids per caption, start-of-text included (2..{context_length})")]

    async def caption(state: State, file: UploadFile = File(description="an image file"), *,
                      strategy: Literal["greedy", "beam"] = "greedy", num_beams: beams = 3,
                      max_length: length = default_length) -> dict[str, Any]:
        start = time.perf_counter()
        image = await _upload(state, file)
        settings = {"strategy": strategy, "num_beams": num_beams, "max_length": max_length}
        words = await anyio.to_thread.run_sync(lambda: state.encoder.caption([image], **settings)[0])
        return {"caption": words, "strategy": strategy, "took_ms": _took_ms(start)}

    app.add_api_route("/caption", caption, methods=["POST"], summary="Caption an uploaded image (CoCa models)",
                      response_model=CaptionResponse, responses=errors(texts, 400, 413, 415, 422))
