"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends its
headers a byte at a time (slowloris) is held for as long as it likes. This protocol closes a
connection whose request headers are not complete `header_timeout_s` after the connection opened
or the first byte of the next request arrived (idle keep-alive time is uvicorn's own timeout). Body deadlines are the request guard's (middleware.py).
"""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_ENV = "LESION_HEADER_TIMEOUT_S"


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s = float(os.environ.get(HEADER_TIMEOUT_ENV, "10"))

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
