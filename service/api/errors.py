"""Every error a client can cause becomes a JSON body {detail, request_id} with a 4xx status.

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

from service.api.batching import BatcherStopped
from service.api.logs import exception_summary, printable
from service.core.metadata import MetadataError
from service.core.preprocess import ImageError, ImageShapeError, ImageTooLargeError, UnsupportedImageError

log = logging.getLogger("service")
CLOSE = {"Connection": "close"}  # refused before the body was read: do not read the rest of it
BUSY = {**CLOSE, "Retry-After": "1"}
MAX_DETAIL = 2000  # characters of an error detail


def error_response(status: int, detail: str, request_id: str | None, headers: dict | None = None) -> JSONResponse:
    body = {"detail": printable(detail, MAX_DETAIL), "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def image_status(exc: ImageError) -> int:
    return input_problem(exc)[0]


def input_problem(exc: ImageError | MetadataError) -> tuple[int, str]:
    """(HTTP status, stable code) of an image or metadata a client sent that cannot be used."""
    if isinstance(exc, MetadataError):
        return 422, "metadata-invalid"
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
        return error_response(exc.status_code, str(exc.detail), request_id(request), exc.headers)

    @app.exception_handler(MetadataError)
    async def metadata_error(request: Request, exc: MetadataError) -> JSONResponse:
        return error_response(422, str(exc), request_id(request))

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return error_response(image_status(exc), str(exc), request_id(request))

    @app.exception_handler(BatcherStopped)
    async def batcher_stopped(request: Request, exc: BatcherStopped) -> JSONResponse:
        return error_response(503, str(exc), request_id(request), {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"][1:]) or "request"
            parts.append(f"missing form field '{where}'" if e["type"] == "missing" else f"{where}: {e['msg']}")
        return error_response(422, "; ".join(parts), request_id(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error, request id %s: %s", request_id(request), exception_summary(exc))
        return error_response(500, "internal error; the request id is in the logs", request_id(request))
