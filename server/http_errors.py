"""The one mapping from errors to HTTP responses. Route handlers only raise.

Each route family answers errors in the shape its peers' clients parse:

* OpenAI-style routes: ``{"error": {"type", "message", "code"}}``;
* TGI routes: TGI's ``{"error", "error_type"}``, so that the stock ``text_generation`` client raises its own typed
  errors;
* TEI's shape (``/classify``, ``/predict``): TEI's ``ErrorResponse`` ``{"error", "error_type"}`` with TEI's types
  as TEI serializes them (``Validation``, ``Overloaded``, ``Unhealthy``, ``Backend``: ``ErrorType`` in
  text-embeddings-inference ``router/src/lib.rs``, no serde rename), the ``error`` string ``huggingface_hub`` shows as
  the message;
* the FMS detector API (``/api/v1/text/...``): its ``Error`` ``{"code", "message"}``, what the orchestrator's
  detector client deserializes from every non-200 answer (fms-guardrails-orchestrator ``src/clients/detector.rs``,
  ``DetectorError``; anything else reaches its users as an empty message).
"""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ValueprobeError

logger = logging.getLogger(__name__)

TGI_PATHS = ("/generate", "/generate_stream")
TEI_PATHS = ("/classify", "/predict")
FMS_PREFIX = "/api/v1/text/"

Shape = Literal["openai", "tgi", "tei", "fms"]
# our error types as TEI names them (TEI's ErrorType); any other 4xx is "Validation", any other 5xx "Backend"
TEI_TYPES = {"not_ready": "Unhealthy", "overloaded": "Overloaded"}


def shape_of(request: Request) -> Shape:
    path = request.url.path
    if path in ("/",) + TGI_PATHS:
        return "tgi"
    if path in TEI_PATHS:
        return "tei"
    if path.startswith(FMS_PREFIX):
        return "fms"
    return "openai"


def status_for(shape: Shape, status: int) -> int:
    """The status a route family answers: the detector API documents only 404 and 422 (``Validation Error``), so
    there a malformed request (a body that does not parse, a refused value) is a 422 rather than a 400."""
    return 422 if shape == "fms" and status == 400 else status


def error_body(status: int, type_: str, message: str, tgi_type: str, *, tgi: bool = False, shape: Shape | None = None,
               metrics=None) -> dict:
    """The one error body of every route, counted: in the ``shape`` of the route's peers (``tgi=True`` is the TGI
    shape). Response handlers and a stream's in-band error event both use it."""
    if metrics is not None:
        metrics.errors.labels(type=type_).inc()
    shape = shape or ("tgi" if tgi else "openai")
    if shape == "tgi":
        return {"error": message, "error_type": tgi_type}
    if shape == "tei":
        return {"error": message, "error_type": TEI_TYPES.get(type_, "Validation" if status < 500 else "Backend")}
    if shape == "fms":
        return {"code": status, "message": message}
    return {"error": {"type": type_, "message": message, "code": status}}


def exception_body(exc: Exception, *, tgi: bool = False, shape: Shape | None = None, metrics=None) -> tuple[int, dict]:
    """``(status, body)`` for an exception: a domain error as its class says, anything else a logged 500 whose
    message reveals nothing."""
    if isinstance(exc, ValueprobeError):
        status = status_for(shape, exc.status_code)
        return status, error_body(status, exc.type, str(exc), exc.tgi_type, tgi=tgi, shape=shape, metrics=metrics)
    return 500, error_body(500, "server_error", "internal error (logged on the server)", "generation", tgi=tgi,
                           shape=shape, metrics=metrics)


def error_response(request: Request, status: int, type_: str, message: str, tgi_type: str, headers=None, metrics=None):
    shape = shape_of(request)
    status = status_for(shape, status)
    body = error_body(status, type_, message, tgi_type, shape=shape, metrics=metrics)
    return JSONResponse(body, status_code=status, headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    def metrics():
        return getattr(app.state, "metrics", None)

    @app.exception_handler(ValueprobeError)
    async def _valueprobe(request: Request, exc: ValueprobeError):
        status, body = exception_body(exc, shape=shape_of(request), metrics=metrics())
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
        status, body = exception_body(exc, shape=shape_of(request), metrics=metrics())
        return JSONResponse(body, status_code=status)
