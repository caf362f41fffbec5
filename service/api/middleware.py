"""The request guard: one pure-ASGI middleware in front of every route.

In order, before the app sees a request: a valid request id (the client's, if it is 1-64 safe
characters, else a new one); the API key, checked before one byte of the body is read;
admission (a bounded number of requests with a body, and of their bytes, per worker: past
either, 503 with Retry-After, never an unbounded queue); the body size, counted on the bytes
actually received whatever Content-Length or Transfer-Encoding say, with a deadline between
chunks and one for the whole body. After: security headers, Prometheus metrics, one log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match, Mount

from service.api.auth import access_refusal, route_path
from service.api.errors import BUSY, CLOSE, ApiError, error_response
from service.api.forms import PART_LIMITS, PartLimits
from service.api.metrics import Metrics
from service.api.settings import BINARY_HEADER, Settings
from service.api.state import ModelState

log = logging.getLogger("service.requests")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def byte_count(header: str | None) -> int | None:
    """A Content-Length value as a number, or None when absent or not one."""
    if header is None or not (header.isascii() and header.isdigit() and len(header) <= 18):
        return None  # 19 digits and more: no body is that large, and int() of thousands is refused
    return int(header)


def route_label(scope: Scope, path: str) -> str:
    """The route's path template, for metrics and logs. FastAPI's routes name themselves in the scope
    once routed; a request refused before routing, the OpenAPI schema and the docs assets (a plain
    route and a mount) are matched here on the route path taken before routing rewrote the scope."""
    route = scope.get("route")
    if route is not None:
        return route.path
    probe = {**scope, "path": path, "root_path": ""}
    for candidate in getattr(scope.get("app"), "routes", []):
        if isinstance(candidate, Mount):
            if path.startswith(candidate.path + "/"):
                return candidate.path + "/{path}"
            continue
        match, child = candidate.matches(probe)
        if match == Match.FULL:
            found = child.get("route", candidate)
            return getattr(found, "path", "unmatched")
    return "unmatched"


class RequestGuard:
    def __init__(self, app, settings: Settings, metrics: Metrics, state: ModelState, security_headers: dict[str, str]):
        self.app, self.settings, self.metrics, self.state = app, settings, metrics, state
        self.security_headers = security_headers
        self.inflight_requests = 0  # requests with a body this worker holds (one event loop: no lock)
        self.inflight_bytes = 0  # what the bodies they sent so far cost in memory (bytes x Settings.body_cost)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), route_path(scope)
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
        binary = BINARY_HEADER.lower() in headers  # the protocol's binary extension
        body = Body(self, headers, limit, self.settings.body_cost(scope["path"], binary))
        parts = PART_LIMITS.set(PartLimits(self.settings.max_upload_bytes, self.settings.max_metadata_bytes))
        try:
            refusal = self.refusal(scope, headers, limit)
            if refusal is None and body.expected:
                refusal = self.admit(body)
            if refusal is not None:
                code, problem, detail = refusal
                close = BUSY if code == 503 else CLOSE
                response = error_response(code, detail, request_id, close, problem, route_path(scope))
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, body.receiver(receive), send_with_headers)
        finally:
            body.release()
            PART_LIMITS.reset(parts)
            self.observe(scope, path, status["code"], time.perf_counter() - start, request_id)

    def admit(self, body: Body) -> tuple[int, str, str] | None:
        """Take the request in, or say why not: the worker already holds as many requests as it may,
        or its body would not fit beside the bytes the others have actually sent (what they only
        declare is not held for them: a slow sender cannot reserve the bound and starve the rest)."""
        s = self.settings
        if self.inflight_requests >= s.max_inflight_requests:
            return 503, "busy", f"this worker is busy ({s.max_inflight_requests} requests in flight); retry shortly"
        if self.inflight_bytes + int(body.declared * body.cost) > s.max_inflight_bytes:
            return (
                503,
                "busy",
                f"this worker is busy (request bodies in flight near its {s.max_inflight_bytes} byte bound); retry shortly",
            )
        body.admitted = True
        self.inflight_requests += 1
        self.metrics.inflight_requests.inc()
        return None

    def refusal(self, scope: Scope, headers: Headers, limit: int) -> tuple[int, str, str] | None:
        """What to answer without reading the body, or None to go on."""
        denied = access_refusal(route_path(scope), headers, self.settings)  # service/api/auth.py: the one policy
        if denied is not None:
            return denied
        length, chunked = headers.get("content-length"), headers.get("transfer-encoding")
        if length is not None and chunked is not None:
            return 400, "request-invalid", "send either Content-Length or Transfer-Encoding, not both"
        if len(headers.getlist(BINARY_HEADER)) > 1:  # which one would the body follow?
            return 400, "request-invalid", f"send one {BINARY_HEADER} header, not several"
        declared = byte_count(length)
        if length is not None and declared is None:
            return 400, "request-invalid", "Content-Length must be a number of bytes"
        if declared is not None and declared > limit:
            return 413, "body-too-large", f"request body is over the {limit} byte limit"
        return None

    def observe(self, scope: Scope, path: str, status: int, elapsed: float, request_id: str) -> None:
        route = route_label(scope, path)
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
        level = (
            logging.WARNING if status == 503 else logging.ERROR if status >= 500 else logging.INFO
        )  # 503: backpressure
        log.log(level, text, extra=fields)


class Body:
    """One request's body as the guard sees it: its bytes counted against the request's limit and
    the worker's in-flight bound as they arrive, under the gap and total deadlines."""

    def __init__(self, guard: RequestGuard, headers: Headers, limit: int, cost: float = 1) -> None:
        self.guard, self.limit, self.cost = guard, limit, cost  # cost: memory per body byte (Settings.body_cost)
        self.declared = byte_count(headers.get("content-length")) or 0
        self.expected = self.declared > 0 or "transfer-encoding" in headers
        self.admitted = False
        self.received = 0  # body bytes so far
        self.held = 0  # what they cost (received x cost), counted in the guard's in-flight total once admitted

    def receiver(self, receive: Receive) -> Receive:
        settings = self.guard.settings
        deadline = time.monotonic() + settings.body_deadline_s
        complete = not self.expected

        async def receive_counted() -> Message:
            nonlocal complete
            if complete:  # the body is in: later receives wait for a disconnect, with no deadline
                return await receive()
            wait = min(settings.body_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    detail = f"the request body did not arrive within {settings.body_deadline_s:g} s"
                else:
                    detail = f"the request body stalled for over {settings.body_timeout_s:g} s"
                raise ApiError(408, "body-timeout", detail, CLOSE) from None
            if message["type"] == "http.request":
                self.count(len(message.get("body", b"")))
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return receive_counted

    def count(self, n: int) -> None:
        if self.received + n > self.limit:
            raise ApiError(413, "body-too-large", f"request body is over the {self.limit} byte limit", CLOSE)
        guard = self.guard
        cost = int((self.received + n) * self.cost) - self.held
        if self.admitted and guard.inflight_bytes + cost > guard.settings.max_inflight_bytes:
            raise ApiError(503, "busy", "this worker is busy (request bodies in flight); retry shortly", BUSY)
        self.received += n
        if self.admitted:
            self.held += cost
            guard.inflight_bytes += cost
            guard.metrics.inflight_bytes.inc(cost)

    def release(self) -> None:
        if self.admitted:
            self.guard.inflight_requests -= 1
            self.guard.inflight_bytes -= self.held
            self.guard.metrics.inflight_requests.dec()
            self.guard.metrics.inflight_bytes.dec(self.held)
            self.admitted = False
