"""Opening a bundle's files: regular files directly inside its folder, of a bounded size, never
through a symbolic link (the folder itself may be one: a `current` link to the served bundle)."""

from __future__ import annotations

import errno
import os
import stat
from io import BufferedReader
from pathlib import Path

from service.core.errors import BundleError

MAX_FILE_BYTES = 4 * 1024**3  # a five-fold fp32 ensemble graph is ~230 MB


def open_regular(bundle_dir: Path, name: str) -> BufferedReader:
    """`name` directly inside the bundle folder, opened only if it is a regular file: a symbolic
    link is never followed (O_NOFOLLOW), and a FIFO or device is refused before it is read."""
    root = bundle_dir.resolve()
    path = root / name
    if path.parent != root:
        raise BundleError(f"bundle file {name} resolves outside {bundle_dir}: refusing to open it")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BundleError(f"bundle file {name} is missing from {bundle_dir}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"bundle file {name} is a symbolic link: refusing to open it") from None
        raise BundleError(f"bundle file {name} cannot be opened: {exc.strerror}") from None
    f = os.fdopen(fd, "rb")
    assert isinstance(f, BufferedReader)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise BundleError(f"bundle file {name} is not a regular file: refusing to read it")
    return f


def read_bounded(bundle_dir: Path, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular bundle file's bytes, refused past `limit` bytes before they are read."""
    with open_regular(bundle_dir, name) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise BundleError(
            f"bundle file {name} is {max(size, len(data))} bytes, over the {limit} a bundle file may have"
        )
    return data
