"""The sidecar's domain errors. No web framework here: each error carries the HTTP status and error type it maps
to, and :mod:`.http_errors` is the one place that turns them (and FastAPI's own errors) into responses.
"""

from __future__ import annotations


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


class ConflictError(ClientError):
    """The request is valid but the state does not allow it (e.g. promoting a shadow calibrator that is not better)."""

    status_code = 409
    type = "conflict_error"


class ServerError(ValueprobeError):
    pass


class StorageError(ServerError):
    """Writing or reading the sidecar's own files failed (a promoted calibration that could not be saved): the
    server's fault, never the client's."""

    status_code = 500
    type = "storage_error"


class StoreUnavailableError(ServerError):
    """The request and feedback store does not answer: a label cannot be kept, so it is not acknowledged (the
    client retries; answers go on meanwhile)."""

    status_code = 503
    type = "store_unavailable"
    headers = {"Retry-After": "5"}


class UpstreamError(ServerError):
    status_code = 502
    type = "upstream_error"


class UpstreamRejectedError(UpstreamError):
    """The upstream refused the sidecar's request (a 4xx other than 408/429): a model name it does not serve, an API
    key, a path — the configuration — or a request it cannot take (too long for its context). Never answered as a
    refusal text: 400 when the upstream said the request was invalid (400/413/422, its message passed on), 502
    otherwise (the gateway is misconfigured)."""

    type = "upstream_rejected"

    def __init__(self, message: str, *, upstream_status: int | None = None):
        super().__init__(message)
        self.upstream_status = upstream_status
        self.status_code = 400 if upstream_status in (400, 413, 422) else 502


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


def error_types() -> tuple[str, ...]:
    """Every ``type`` an error response can carry (the bounded label set of ``valueprobe_errors_total``)."""
    seen, todo = {ValueprobeError.type}, [ValueprobeError]
    while todo:
        for sub in todo.pop().__subclasses__():
            seen.add(sub.type)
            todo.append(sub)
    return tuple(sorted(seen))
