"""The one mapping from errors to HTTP responses. Route handlers only raise.

OpenAI-style routes answer ``{"error": {"type", "message"}}``; TGI routes answer TGI's ``{"error", "error_type"}``
so that the stock ``text_generation`` client raises its own typed errors.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ValueprobeError

logger = logging.getLogger(__name__)

TGI_PATHS = ("/generate", "/generate_stream")


def _is_tgi(request: Request) -> bool:
    return request.url.path in ("/",) + TGI_PATHS


def error_body(status: int, type_: str, message: str, tgi_type: str, *, tgi: bool, metrics=None) -> dict:
    """The one error body of every route, counted: TGI's ``{"error", "error_type"}`` or ``{"error": {type,
    message, code}}``. Response handlers and a stream's in-band error event both use it."""
    if metrics is not None:
        metrics.errors.labels(type=type_).inc()
    if tgi:
        return {"error": message, "error_type": tgi_type}
    return {"error": {"type": type_, "message": message, "code": status}}


def exception_body(exc: Exception, *, tgi: bool, metrics=None) -> tuple[int, dict]:
    """``(status, body)`` for an exception: a domain error as its class says, anything else a logged 500 whose
    message reveals nothing."""
    if isinstance(exc, ValueprobeError):
        return exc.status_code, error_body(exc.status_code, exc.type, str(exc), exc.tgi_type, tgi=tgi, metrics=metrics)
    return 500, error_body(500, "server_error", "internal error (logged on the server)", "generation", tgi=tgi,
                           metrics=metrics)


def error_response(request: Request, status: int, type_: str, message: str, tgi_type: str, headers=None, metrics=None):
    body = error_body(status, type_, message, tgi_type, tgi=_is_tgi(request), metrics=metrics)
    return JSONResponse(body, status_code=status, headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    def metrics():
        return getattr(app.state, "metrics", None)

    @app.exception_handler(ValueprobeError)
    async def _valueprobe(request: Request, exc: ValueprobeError):
        status, body = exception_body(exc, tgi=_is_tgi(request), metrics=metrics())
        return JSONResponse(body, status_code=status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(request, 422, "invalid_request_error", "; ".join(parts) or "invalid request", "validation",
                              metrics=metrics())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # the framework's own headers stay (a 405 names the methods the route takes in Allow, as HTTP requires)
        return error_response(request, exc.status_code, kind, str(exc.detail), "validation",
                              headers=getattr(exc, "headers", None), metrics=metrics())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        status, body = exception_body(exc, tgi=_is_tgi(request), metrics=metrics())
        return JSONResponse(body, status_code=status)
