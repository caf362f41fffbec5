"""Per-request plumbing: request id, body-size guard, Prometheus metrics and one log line."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request, Response

from service.api.errors import error_response
from service.api.metrics import Metrics
from service.api.settings import Settings

log = logging.getLogger("service")


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        start = time.perf_counter()
        length = request.headers.get("content-length")
        limit = settings.max_request_bytes(request.url.path)
        if request.method == "POST" and length is None:
            response: Response = error_response(411, "send a Content-Length header", request_id)
        elif length is not None and length.isdigit() and int(length) > limit:
            response = error_response(413, f"request body is over the {limit} byte limit", request_id)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - start
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(elapsed)
        response.headers["X-Request-ID"] = request_id
        log.info("%s %s %s %.1fms id=%s", request.method, path, response.status_code, 1000 * elapsed, request_id)
        return response
