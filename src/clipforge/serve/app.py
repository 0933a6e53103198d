"""`create_app(index_dir)`: a FastAPI app that embeds queries and searches one image index.

The model is loaded once per app; embedding requests go through micro-batching queues so that
concurrent callers share forward passes. URLs carry index ids, never paths, and `/images/{id}` serves
only files the index recorded. Every error is JSON `{"error": message, "status": code}`.
"""
# No `from __future__ import annotations`: FastAPI must resolve the request models defined inside
# create_app (their limits come from the config), and string annotations cannot see function locals.
import asyncio
import logging
import mimetypes
import sqlite3
import tarfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipforge.serve.batching import MicroBatcher
from clipforge.data.images import SampleError, decode_image
from clipforge.text.tokenizer import TextTooLong
from clipforge.serve.schemas import (EmbedImageResponse, EmbedTextResponse, HealthResponse, SearchResponse,
                                     error_texts, errors)
from clipforge.errors import ConfigError

log = logging.getLogger("clipforge.serve")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an upload


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
    device: str = "cpu"  # where the query model runs (clipforge.device.resolve_device)


class BodyTooLarge(StarletteHTTPException):
    """413 raised while the body streams in (a starlette HTTPException so FastAPI re-raises it as is)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large: the limit is {limit} bytes")


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes by Content-Length, or while they stream in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            error = BodyTooLarge(self.limit)
            return await JSONResponse(_error_body(413, error.detail), 413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # chunked uploads have no Content-Length to check up front
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


def _error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, "status": status, **extra}


# The shared decode policy's reasons, as HTTP statuses (README "Serve" and the OpenAPI spec list them).
_UPLOAD_STATUS = {"empty_file": 400, "too_many_pixels": 413}


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image with clipforge's one image policy, or raise a 4xx HTTPException saying why not."""
    try:
        return decode_image(data, max_pixels, name="the upload")
    except SampleError as error:
        status = _UPLOAD_STATUS.get(error.reason, 415)
        message = {400: "the upload is empty", 413: f"the image is over {max_pixels} pixels ({error.detail})"}
        raise HTTPException(status, message.get(status, f"the upload is not a readable image ({error.detail})")) from None


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


def create_app(index_dir: str | Path, config: ServeConfig | None = None, encoder: Any = None) -> FastAPI:
    """The search app for one index; raises FileNotFoundError / ValueError if index_dir is not an index."""
    from clipforge.search import ImageIndex, QueryEncoder

    cfg = config or ServeConfig()
    if not 1 <= cfg.default_k <= cfg.max_k:
        raise ConfigError(f"default_k must be within 1..{cfg.max_k}, got {cfg.default_k}")
    index = ImageIndex.open(index_dir)
    if encoder is None:
        from clipforge.checkpoint.io import refuse_random_weights

        refuse_random_weights(index.model, cfg.allow_random_weights)
    encoder = encoder or QueryEncoder(index.model, device=cfg.device, pretrained=index.pretrained)  # the one model of this app, loaded here, once
    wait = cfg.batch_wait_ms / 1000
    texts = MicroBatcher(encoder.embed_texts, cfg.max_batch, wait, name="text-batcher")
    images = MicroBatcher(encoder.embed_images, cfg.max_batch, wait, name="image-batcher")
    page = resources.files("clipforge.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        texts.close()
        images.close()

    app = FastAPI(title="clipforge search", version="1", lifespan=lifespan,
                  description="Text and image search over a clipforge image index.")
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes + MULTIPART_OVERHEAD)
    app.state.index, app.state.encoder, app.state.config = index, encoder, cfg
    app.state.batchers = {"text": texts, "image": images}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(error.status_code, str(error.detail)), error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body'))}: {e['msg']}"
                    for e in error.errors()]
        return JSONResponse(_error_body(422, "invalid request: " + "; ".join(problems),
                                        detail=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]),
                            422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(_error_body(500, "internal server error"), 500)

    texts_of_errors = error_texts({**asdict(cfg), "context_length": encoder.model.context_length})
    QueryText = Annotated[str, Query(min_length=1, max_length=cfg.max_query_chars, description="text query")]
    K = Annotated[int, Query(ge=1, le=cfg.max_k, description=f"results to return (1..{cfg.max_k})")]
    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_query_chars)]

    class EmbedTextRequest(BaseModel):
        texts: list[Text] = Field(min_length=1, max_length=cfg.max_texts)

    async def read_upload(file: UploadFile) -> Image.Image:
        data = await file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, f"upload too large: the limit is {cfg.max_upload_bytes} bytes")
        return await anyio.to_thread.run_sync(decode_upload, data, cfg.max_image_pixels)

    async def embed(batcher: MicroBatcher, item: Any) -> np.ndarray:
        try:
            return await batcher.embed(item)
        except TextTooLong:  # the caller's to fix
            raise HTTPException(422, f"invalid request: the text is longer than the model's context of "
                                     f"{encoder.model.context_length} tokens") from None

    def lookup(image_id: int) -> dict[str, Any]:
        try:
            return index.record(image_id)
        except OverflowError:  # an id beyond SQLite's 64-bit integers cannot be in the index
            raise KeyError(image_id) from None
        except sqlite3.Error as error:  # the index folder was removed or replaced under a running server
            raise HTTPException(503, f"the index metadata is unavailable ({error}): restart the server") from None

    async def search(vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        scores, ids = await anyio.to_thread.run_sync(index.search, vector[None].astype(np.float32), k)
        results = []
        # Approximate backends pad with id -1 (score -inf) when they find fewer than k: not results.
        found = [(score, image_id) for score, image_id in zip(scores[0].tolist(), ids[0].tolist()) if image_id >= 0]
        for rank, (score, image_id) in enumerate(found, 1):
            record = lookup(int(image_id))
            # The file name only: absolute paths on the server are none of the client's business.
            name = record["path"].rsplit("#", 1)[-1].replace("\\", "/").rsplit("/", 1)[-1]
            results.append({"rank": rank, "id": int(image_id), "score": round(float(score), 6),
                            "url": f"/images/{int(image_id)}", "name": name, "caption": record.get("caption")})
        return results

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness and index facts", response_model=HealthResponse)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "images": len(index), "dim": index.dim, "model": Path(str(index.model)).name,
                "limits": asdict(cfg),
                "batches": {n: {"batches": b.batches, "items": b.items} for n, b in app.state.batchers.items()}}

    @app.post("/embed/text", summary="Embed texts (L2-normalised)", response_model=EmbedTextResponse,
              responses=errors(texts_of_errors, 400, 413, 422))
    async def embed_text(body: EmbedTextRequest) -> dict[str, Any]:
        start = time.perf_counter()
        rows = await asyncio.gather(*(embed(texts, text) for text in body.texts))
        return {"dim": index.dim, "embeddings": np.asarray(rows, dtype=np.float32).tolist(),
                "took_ms": round(1000 * (time.perf_counter() - start), 3)}

    @app.post("/embed/image", summary="Embed an uploaded image (L2-normalised)", response_model=EmbedImageResponse,
              responses=errors(texts_of_errors, 400, 413, 415, 422))
    async def embed_image(file: UploadFile = File(description="an image file")) -> dict[str, Any]:
        start = time.perf_counter()
        row = await embed(images, await read_upload(file))
        return {"dim": index.dim, "embedding": row.astype(np.float32).tolist(),
                "took_ms": round(1000 * (time.perf_counter() - start), 3)}

    @app.get("/search", summary="Search the index with a text query", response_model=SearchResponse,
             responses=errors(texts_of_errors, 422, 503))
    async def search_text(q: QueryText, k: K = cfg.default_k) -> dict[str, Any]:
        start = time.perf_counter()
        if not q.strip():
            raise HTTPException(422, "invalid request: q: the query is blank")
        results = await search(await embed(texts, q), k)
        return {"query": q, "k": k, "results": results, "took_ms": round(1000 * (time.perf_counter() - start), 3)}

    @app.post("/search/image", summary="Search the index with an uploaded image", response_model=SearchResponse,
              responses=errors(texts_of_errors, 400, 413, 415, 422, 503))
    async def search_image(file: UploadFile = File(description="an image file"), k: K = cfg.default_k) -> dict[str, Any]:
        start = time.perf_counter()
        results = await search(await embed(images, await read_upload(file)), k)
        return {"k": k, "results": results, "took_ms": round(1000 * (time.perf_counter() - start), 3)}

    @app.get("/images/{image_id}", summary="An indexed image, by id", response_class=Response,
             responses={200: {"content": {"image/*": {}}, "description": "the image file"}, **errors(texts_of_errors, 404, 422, 503)})
    async def image(image_id: int) -> Response:
        try:
            record = lookup(image_id)
        except (KeyError, IndexError, ValueError):
            raise HTTPException(404, f"no image with id {image_id} in this index") from None
        except OSError:
            raise HTTPException(404, f"image {image_id} is indexed but its file is gone") from None
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

    return app
