"""uvicorn's h11 protocol with a deadline for request headers, and its own errors as problems.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends its
headers a byte at a time (slowloris) is held for as long as it likes. This protocol closes a
connection whose request headers are not complete `header_timeout_s` after the connection opened
or the first byte of the next request arrived (idle keep-alive time is uvicorn's own timeout). Body deadlines are the request guard's (middleware.py).

A request h11 cannot parse never reaches the app: uvicorn answers it 400 in plain text. Here it is
an RFC 9457 problem like every other error, with a request id.

An answer that closes the connection before the request's body is in (a 408, a 413, a 401 to an
upload) would often never reach the client: closing a socket with unread bytes makes the kernel
send a reset, and the client's kernel then drops the answer it had buffered. Like nginx's
lingering close, the connection is half-closed after the answer and what the client still sends
is read and dropped for `close_linger_s` (or until it closes its end, or has sent as much as the
largest body any route accepts), then closed: draining stays bounded in time and in bytes. A client
that writes its whole body before it reads (Python's http.client, curl) thus reads the answer
whenever its body arrives within `close_linger_s`; past that it sees the connection reset.

Each connection takes these limits from the settings of the app its server serves (create_app
keeps them in `app.state.settings`), read when the connection opens: several servers in one
process, each with its own app, each keep their own; a server of another app gets the defaults.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import PROBLEM_JSON, problem_body
from service.api.settings import Settings


class LingeringTransport:
    """The connection's transport, whose close() while the client is still sending a body
    half-closes it, reads and drops what the client sends for `linger_s`, then closes it.
    Everything else is the transport's own."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        linger_s: float,
        sending: Callable[[], bool],
        max_bytes: int,
    ) -> None:
        self._transport, self._loop, self._linger_s, self._sending = transport, loop, linger_s, sending
        self._max_bytes = max_bytes  # a client still sending past this after the answer is cut off
        self.active = False  # the answer is sent and the client's bytes are being dropped
        self._dropped = 0  # bytes read and dropped since
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.active or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if self._linger_s <= 0 or not self._sending() or not self._transport.can_write_eof():  # TLS cannot half-close
            self._transport.close()
            return
        self.active = True
        self._transport.write_eof()  # the answer, then FIN: the client reads it and closes its end
        self._transport.resume_reading()  # flow control may have paused it: keep draining
        self._timer = self._loop.call_later(self._linger_s, self._transport.close)

    def close_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._transport.is_closing():
            self._transport.close()

    def drop(self, n: int) -> None:
        """Count `n` more bytes read and dropped; past the most a body may hold, close."""
        self._dropped += n
        if self._dropped > self._max_bytes:
            self.close_now()

    def pause_reading(self) -> None:
        if not self.active:
            self._transport.pause_reading()


class ConnectionLimits(NamedTuple):
    header_timeout_s: float  # for a request's headers
    close_linger_s: float  # the lingering close after an answer sent before the body was read
    linger_max_bytes: int  # ... which drops at most the largest body a route accepts

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.header_timeout_s, settings.close_linger_s, settings.largest_body_bytes())


DEFAULT_LIMITS = ConnectionLimits.of(Settings.model_construct())  # the defaults, not the environment's


def served_settings(app: object) -> Settings | None:
    """The settings of the app a server serves, or None if it is not one create_app made. uvicorn
    wraps the app in its own middleware (proxy headers, message logging), each keeping it as `.app`."""
    for _ in range(8):  # a few wrappers at most
        settings = getattr(getattr(app, "state", None), "settings", None)
        if isinstance(settings, Settings):
            return settings
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


def connection_limits(app: object) -> ConnectionLimits:
    settings = served_settings(app)
    return DEFAULT_LIMITS if settings is None else ConnectionLimits.of(settings)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol (`http=`), with the limits of the app it serves."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.limits = connection_limits(self.app)  # the served app's settings, not the process's
        self.linger = LingeringTransport(
            transport,
            asyncio.get_running_loop(),
            self.limits.close_linger_s,
            self._sending_body,
            self.limits.linger_max_bytes,
        )
        super().connection_made(self.linger)  # type: ignore[arg-type]
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()  # the first request's headers

    def data_received(self, data: bytes) -> None:
        if self.linger.active:  # the answer is sent: what the client still sends is dropped
            self.linger.drop(len(data))
            return
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._waiting_after:
            self._disarm()  # a new request's headers are complete (pipelined ones included)

    def _sending_body(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.linger.close_now()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle
        self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.linger.close_now()  # no answer to deliver: nothing to linger for

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            # a body that stops being HTTP after the app got its headers: the app's own answer, once it
            # comes, goes nowhere (h11 would refuse it after this 400: an "internal error" in the log)
            self.cycle.disconnected = True
        request_id = uuid.uuid4().hex[:16]
        detail = f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})"
        body = json.dumps(problem_body(400, "request-invalid", detail, request_id)).encode()
        headers = [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        start = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        for event in (start, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
