"""HTTP plumbing of the search app: every error as JSON `{"error": message, "status": code}`, and the body limit."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("clipforge.serve")


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": message, "status": status, **extra}


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
            return await JSONResponse(error_body(413, error.detail), 413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # chunked uploads have no Content-Length to check up front
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """An HTTPException (ours, or starlette's 404/405) as the JSON error body."""
    return JSONResponse(error_body(error.status_code, str(error.detail)), error.status_code,
                        headers=getattr(error, "headers", None))


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A 422 naming each failing field in one message, with the fields themselves under `detail`."""
    problems = [f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body'))}: {e['msg']}"
                for e in error.errors()]
    return JSONResponse(error_body(422, "invalid request: " + "; ".join(problems),
                                   detail=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]),
                        422)


async def server_error(request: Request, error: Exception) -> JSONResponse:
    """A 500 that logs the traceback and tells the client nothing of the server's internals."""
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(500, "internal server error"), 500)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with the JSON error body."""
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, server_error)
