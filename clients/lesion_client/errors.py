"""The client's exceptions: every failure a caller sees is a `LesionError`."""

from __future__ import annotations


class LesionError(Exception):
    """Base class: anything that went wrong talking to the service."""


class LesionAPIError(LesionError):
    """The service answered with an error (an RFC 9457 problem): `status`, the stable `code` a
    program branches on (image-too-large, metadata-invalid, busy, ...), the `detail` message for a
    person and the `request_id` to quote."""

    def __init__(self, status: int, detail: str, request_id: str | None = None, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.request_id = status, detail, request_id
        self.code = code or f"http-{status}"  # a server (or proxy) that sent no problem body


class LesionConnectionError(LesionError, ConnectionError):
    """The service could not be reached (after the retries)."""


class LesionTimeout(LesionError, TimeoutError):
    """The service did not answer in time."""
