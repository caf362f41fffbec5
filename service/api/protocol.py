"""uvicorn's h11 protocol with a deadline for request headers, and its own errors as problems.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends its
headers a byte at a time (slowloris) is held for as long as it likes. This protocol closes a
connection whose request headers are not complete `header_timeout_s` after the connection opened
or the first byte of the next request arrived (idle keep-alive time is uvicorn's own timeout). Body deadlines are the request guard's (middleware.py).

A request h11 cannot parse never reaches the app: uvicorn answers it 400 in plain text. Here it is
an RFC 9457 problem like every other error, with a request id.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import PROBLEM_JSON, problem_body
from service.api.settings import Settings


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s = Settings.model_fields["header_timeout_s"].default  # create_app sets the worker's own

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()  # the first request's headers

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._waiting_after:
            self._disarm()  # a new request's headers are complete (pipelined ones included)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
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
