"""The request guard: one pure-ASGI middleware in front of every route.

In order, before the app sees a request: a valid request id (the client's, if it is 1-64 safe
characters, else a new one); the API key, checked before one byte of the body is read; the body
size, counted on the bytes actually received whatever Content-Length or Transfer-Encoding say,
with a deadline between chunks. After: security headers, Prometheus metrics, one log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders

from service.api.dependencies import API_KEY_HEADER, key_is_valid
from service.api.errors import error_response
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.api.state import ModelState

log = logging.getLogger("service.requests")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PUBLIC_PATHS = {"/", "/docs", "/openapi.json", "/health/live", "/health/ready"}
PUBLIC_PREFIXES = ("/docs-assets/",)
CLOSE = {"Connection": "close"}  # refused before the body was read: do not read the rest of it

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def needs_key(path: str) -> bool:
    return path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES)


class RequestGuard:
    def __init__(self, app, settings: Settings, metrics: Metrics, state: ModelState, security_headers: dict[str, str]):
        self.app, self.settings, self.metrics, self.state = app, settings, metrics, state
        self.security_headers = security_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = Headers(scope=scope)
        sent_id = headers.get("x-request-id", "")
        request_id = sent_id if REQUEST_ID.fullmatch(sent_id) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                h = MutableHeaders(scope=message)
                h["X-Request-ID"] = request_id
                for k, v in self.security_headers.items():
                    h.setdefault(k, v)
            await send(message)

        limit = self.settings.max_request_bytes(scope["path"])
        try:
            refusal = self.refusal(scope, headers, limit)
            if refusal is not None:
                await error_response(*refusal, request_id, CLOSE)(scope, receive, send_with_headers)
            else:
                await self.app(scope, self.counted(receive, limit), send_with_headers)
        finally:
            self.observe(scope, status["code"], time.perf_counter() - start, request_id)

    def refusal(self, scope: Scope, headers: Headers, limit: int) -> tuple[int, str] | None:
        """What to answer without reading the body, or None to go on."""
        if needs_key(scope["path"]) and not key_is_valid(self.settings, headers.get(API_KEY_HEADER)):
            return 401, f"missing or wrong {API_KEY_HEADER} header"
        length, chunked = headers.get("content-length"), headers.get("transfer-encoding")
        if length is not None and chunked is not None:
            return 400, "send either Content-Length or Transfer-Encoding, not both"
        if length is not None and not length.isdigit():
            return 400, "Content-Length must be a number of bytes"
        if length is not None and int(length) > limit:
            return 413, f"request body is over the {limit} byte limit"
        return None

    def counted(self, receive: Receive, limit: int) -> Receive:
        """`receive` that counts body bytes as they arrive and enforces the deadline between chunks."""
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_s)
            except TimeoutError:
                detail = f"the request body stalled for over {self.settings.body_timeout_s:g} s"
                raise HTTPException(408, detail, headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body is over the {limit} byte limit", headers=CLOSE)
            return message

        return receive_counted

    def observe(self, scope: Scope, status: int, elapsed: float, request_id: str) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "status": status,
            "latency_ms": round(1000 * elapsed, 1),
            "bundle_id": self.state.manifest.bundle_id if self.state.manifest else None,
        }
        if self.settings.log_client_address and scope.get("client"):
            fields["client"] = f"{scope['client'][0]}:{scope['client'][1]}"
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        log.log(logging.ERROR if status >= 500 else logging.INFO, text, extra=fields)
