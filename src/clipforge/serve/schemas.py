"""Response bodies of the search API, so the OpenAPI spec documents what each endpoint returns."""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, Field, StringConstraints, create_model


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: a message a person can act on, the status, and for 422 the failing fields."""

    error: str
    status: int
    detail: Optional[list[dict[str, Any]]] = None


class SearchResult(BaseModel):
    """One hit: fetch the image itself from `url` (ids, never paths, appear in URLs)."""

    rank: int
    id: int
    score: float
    url: str
    name: str
    caption: Optional[str] = None
    caption_generated: bool = False  # the caption was written by the index's CoCa model (`index --captions`)


class SearchResponse(BaseModel):
    """Hits best first; fewer than k when the index is smaller."""

    query: Optional[str] = None
    k: int
    results: list[SearchResult]
    took_ms: float


class EmbedTextResponse(BaseModel):
    """One L2-normalised embedding per input text, in order."""

    dim: int
    embeddings: list[list[float]]
    took_ms: float


class EmbedImageResponse(BaseModel):
    """The L2-normalised embedding of the uploaded image."""

    dim: int
    embedding: list[float]
    took_ms: float


class CaptionResponse(BaseModel):
    """The caption a CoCa model wrote for the uploaded image."""

    caption: str
    strategy: str
    took_ms: float


class HealthResponse(BaseModel):
    """Liveness, the index served and the server's limits and batching counters."""

    status: str
    images: int
    dim: int
    model: str
    limits: dict[str, Any]
    batches: dict[str, dict[str, int]]


def text_request_model(max_texts: int, max_chars: int) -> type[BaseModel]:
    """The /embed/text body, `{"texts": [...]}`, with one app's limits (its spec shows them, so one model per app)."""
    text = Annotated[str, StringConstraints(min_length=1, max_length=max_chars)]
    return create_model("EmbedTextRequest", texts=(list[text], Field(min_length=1, max_length=max_texts)))


def error_texts(limits: dict[str, Any]) -> dict[int, str]:
    """What each error status means, with the server's limits (`max_k`, `max_query_chars`, `max_texts`,
    `max_upload_bytes`, `max_image_pixels`, `max_audio_seconds`, `context_length`) written in."""
    return {
        400: "the upload is empty (0 bytes)",
        404: "no image with this id in the index, or its file is gone",
        413: f"request body over {limits['max_upload_bytes']} bytes, an image over {limits['max_image_pixels']} "
             f"pixels (read from its header: never decoded), or a recording over {limits['max_audio_seconds']:g} s",
        415: "the upload is not a readable image (unknown format, corrupt, or an unsupported pixel mode), or on "
             "/search/audio not a usable recording (not audio, corrupt, truncated, or no samples)",
        422: f"invalid parameters: k outside 1..{limits['max_k']}; a query or text empty, blank or over "
             f"{limits['max_query_chars']} characters; more than {limits['max_texts']} texts; or a text over the "
             f"model's context of {limits['context_length']} tokens",
        503: "the index metadata is unavailable (the index folder changed under the server)",
    }


def errors(texts: dict[int, str], *codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses (all share ErrorResponse)."""
    return {code: {"model": ErrorResponse, "description": texts[code]} for code in codes}
