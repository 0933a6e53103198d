"""Response bodies of the search API, so the OpenAPI spec documents what each endpoint returns."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel


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


class HealthResponse(BaseModel):
    """Liveness, the index served and the server's limits and batching counters."""

    status: str
    images: int
    dim: int
    model: str
    limits: dict[str, Any]
    batches: dict[str, dict[str, int]]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses (all share ErrorResponse)."""
    text = {400: "empty upload or unparsable body", 404: "unknown id or file gone", 413: "body, upload or image too large",
            415: "upload is not an image", 422: "invalid parameters", 503: "index metadata unavailable"}
    return {code: {"model": ErrorResponse, "description": text.get(code, "error")} for code in codes}
