"""Multipart parsing that refuses an oversized part as it arrives, not after buffering it.

Starlette's parser bounds the number of parts and the size of plain fields, but buffers a file
part of any size (up to the body limit) before a route can look at it. This subclass counts each
part's bytes as the parser hands them over and stops at the per-image (file) or per-field limit
with a 413. The limits are the serving app's settings, set per request by the request guard
(a context variable: several apps with their own settings may share one process, as in tests).
The spool each uploaded file is written to is sized from the same limits, so every part stays in
memory; nothing here is written per app, and a request no guard set limits for (another app in the
process) is parsed exactly as by Starlette's own parser.
"""

from __future__ import annotations

import codecs
from contextvars import ContextVar
from typing import Any, NamedTuple

import starlette.requests
from starlette.formparsers import MultiPartParser, parse_options_header

from service.api.errors import CLOSE, ApiError


class PartLimits(NamedTuple):
    file_bytes: int  # one uploaded image
    field_bytes: int  # one plain form field (metadata, prior, explain)


PART_LIMITS: ContextVar[PartLimits | None] = ContextVar("part_limits", default=None)


class BoundedMultiPartParser(MultiPartParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = PART_LIMITS.get()  # the request's, from the app that serves it (None: no guard)
        if self.limits is not None:
            charset = parse_options_header(self.headers.get("Content-Type", ""))[1].get(b"charset")
            try:
                name = codecs.lookup(charset.decode("latin-1") if charset else "utf-8").name
            except LookupError:  # Starlette would read the fields as Latin-1
                name = "unknown"
            if name not in ("utf-8", "ascii"):  # UTF-16 hid every field name: the metadata went unread
                raise ApiError(400, "request-invalid", f"the form's charset is {name}: send UTF-8", CLOSE)
            # a file part is refused before it outgrows file_bytes: a spool that size keeps it in memory
            self.spool_max_size = self.limits.file_bytes

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limits = self.limits
        if limits is not None:
            self._part_bytes += end - start
            is_file = self._current_part.file is not None
            limit = limits.file_bytes if is_file else limits.field_bytes
            if self._part_bytes > limit:
                what = (
                    f"image file {self._current_part.file.filename!r}"  # type: ignore[union-attr]
                    if is_file
                    else f"the {self._current_part.field_name} field"
                )
                raise ApiError(
                    413,
                    "image-too-large" if is_file else "field-too-large",
                    f"{what} is over the {limit} byte limit",
                    CLOSE,
                )
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        """A plain field must be UTF-8 text (the only charset a form may declare here): Starlette would
        read undecodable bytes as Latin-1, and a client would get an answer to words it never sent."""
        part = self._current_part
        if self.limits is not None and part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError:
                raise ApiError(
                    400, "request-invalid", f"the {part.field_name[:64]} field is not {self._charset} text", CLOSE
                ) from None
        super().on_part_end()


def install() -> None:
    """Make Starlette's requests parse multipart bodies with the bounded parser (idempotent). The one
    process-wide change, and a fixed one: each request's limits come from the app serving it."""
    starlette.requests.MultiPartParser = BoundedMultiPartParser  # type: ignore[misc]
