"""Error types and their HTTP mapping. Handlers only raise; this module turns errors into responses.

The domain errors (``ValueprobeError`` and subclasses) carry their status; the FastAPI part is only
:func:`register_error_handlers`.

OpenAI-style routes answer ``{"error": {"type", "message"}}``; TGI routes answer TGI's ``{"error", "error_type"}``
so that the stock ``text_generation`` client raises its own typed errors.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

TGI_PATHS = ("/generate", "/generate_stream")


class ValueprobeError(Exception):
    status_code = 500
    type = "server_error"
    tgi_type = "generation"
    headers: dict | None = None


class ClientError(ValueprobeError):
    status_code = 400
    type = "invalid_request_error"
    tgi_type = "validation"


class AuthError(ClientError):
    status_code = 401
    type = "authentication_error"


class ForbiddenError(ClientError):
    status_code = 403
    type = "permission_error"


class NotFoundError(ClientError):
    status_code = 404
    type = "not_found_error"


class ServerError(ValueprobeError):
    pass


class UpstreamError(ServerError):
    status_code = 502
    type = "upstream_error"


class ProbeNotLoadedError(ServerError):
    status_code = 503
    type = "not_ready"


class ProbeFailedError(ServerError):
    """The probe could not score a prefill (a readout or hook failure): a server fault, not "not loaded"."""

    status_code = 500
    type = "probe_error"


class OverloadedError(ServerError):
    status_code = 503
    type = "overloaded"
    tgi_type = "overloaded"
    headers = {"Retry-After": "1"}


def _is_tgi(request: Request) -> bool:
    return request.url.path in ("/",) + TGI_PATHS


def error_response(request: Request, status: int, type_: str, message: str, tgi_type: str, headers=None, metrics=None):
    if metrics is not None:
        metrics.errors.labels(type=type_).inc()
    if _is_tgi(request):
        body = {"error": message, "error_type": tgi_type}
    else:
        body = {"error": {"type": type_, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    def metrics():
        return getattr(app.state, "metrics", None)

    @app.exception_handler(ValueprobeError)
    async def _valueprobe(request: Request, exc: ValueprobeError):
        return error_response(request, exc.status_code, exc.type, str(exc), exc.tgi_type, exc.headers, metrics())

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
        return error_response(request, exc.status_code, kind, str(exc.detail), "validation", metrics=metrics())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, "server_error", "internal error (logged on the server)", "generation",
                              metrics=metrics())
