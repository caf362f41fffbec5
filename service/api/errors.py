"""Every error a client can cause becomes an RFC 9457 problem (`application/problem+json`) with a
4xx status: {type, title, status, code, detail, request_id}, where `code` is stable (a program
branches on it: image-too-large, metadata-invalid, busy, ...) and `detail` is for a person.

Details may quote what the client sent (a metadata value, a file name): they are escaped
(`printable`), so no control character or lone surrogate reaches the response or a log. An
unexpected error is a 500 whose log line names the exception's type and where it was raised,
never its message, which may carry request data.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.api.auth import route_path
from service.api.batching import BatcherStopped
from service.api.logs import exception_summary, printable
from service.core.errors import LesionIdsError, MetadataError
from service.core.preprocess import ImageError, ImageShapeError, ImageTooLargeError, UnsupportedImageError

log = logging.getLogger("service")
CLOSE = {"Connection": "close"}  # refused before the body was read: do not read the rest of it
BUSY = {**CLOSE, "Retry-After": "1"}
MAX_DETAIL = 2000  # characters of an error detail
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "urn:lesion-classifier:problem:"  # + code: the RFC 9457 `type` URI
STATUS_CODES = {  # the code of an error raised without one (Starlette's own 404, 405, a form it cannot parse)
    400: "request-invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    408: "body-timeout",
    413: "body-too-large",
    415: "image-unsupported",
    422: "request-invalid",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An HTTP error with its stable problem code."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(status, detail, headers)
        self.code = code


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


PROTOCOL_PREFIX = "/v2"  # the Open Inference Protocol's routes (routes/inference.py): its own error body


def error_response(
    status: int,
    detail: str,
    request_id: str | None,
    headers: dict | None = None,
    code: str | None = None,
    path: str = "",
) -> JSONResponse:
    """The error as a problem, or on the protocol's routes as its {"error": detail} (with a 400 where
    this API says 422: the protocol has no 422)."""
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        body = {"error": printable(detail, MAX_DETAIL)}
        return JSONResponse(body, status_code=400 if status == 422 else status, headers=headers)
    code = code or STATUS_CODES.get(status, "internal-error" if status >= 500 else "request-invalid")
    return ProblemResponse(problem_body(status, code, detail, request_id), status_code=status, headers=headers)


def problem_body(status: int, code: str, detail: str, request_id: str | None) -> dict:
    return {
        "type": PROBLEM_TYPE + code,
        "title": code.replace("-", " ").capitalize(),
        "status": status,
        "code": code,
        "detail": printable(detail, MAX_DETAIL),
        "request_id": request_id,
    }


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def path_of(request: Request) -> str:
    return route_path(request.scope)


def input_problem(exc: ImageError | MetadataError | LesionIdsError) -> tuple[int, str]:
    """(HTTP status, stable code) of an image, metadata or lesion ids a client sent that cannot be used."""
    if isinstance(exc, MetadataError):
        return 422, "metadata-invalid"
    if isinstance(exc, LesionIdsError):
        return 422, "lesion-ids-invalid"
    if isinstance(exc, UnsupportedImageError):
        return 415, "image-unsupported"
    if isinstance(exc, ImageTooLargeError):
        return 413, "image-too-large"
    if isinstance(exc, ImageShapeError):
        return 422, "image-shape"
    return 400, "image-invalid"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # also 404 and 405
        code = getattr(exc, "code", None)
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, str(exc.detail), request_id(request), headers, code, path_of(request))

    @app.exception_handler(LesionIdsError)
    @app.exception_handler(MetadataError)
    @app.exception_handler(ImageError)
    async def input_error(request: Request, exc: Exception) -> JSONResponse:
        status, code = input_problem(exc)  # type: ignore[arg-type]
        return error_response(status, str(exc), request_id(request), code=code, path=path_of(request))

    @app.exception_handler(BatcherStopped)
    async def batcher_stopped(request: Request, exc: BatcherStopped) -> JSONResponse:
        return error_response(503, str(exc), request_id(request), {"Retry-After": "5"}, "not-ready", path_of(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"][1:]) or "request"
            parts.append(f"missing form field '{where}'" if e["type"] == "missing" else f"{where}: {e['msg']}")
        return error_response(422, "; ".join(parts), request_id(request), code="request-invalid", path=path_of(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error, request id %s: %s", request_id(request), exception_summary(exc))
        detail = "internal error; the request id is in the logs"
        return error_response(500, detail, request_id(request), code="internal-error", path=path_of(request))
