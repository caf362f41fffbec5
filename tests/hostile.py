"""A hostile corpus, generated (no committed binaries): (name, files, form data, status, words in the detail)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.helpers import CLASSES


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def one_bit_png(side: int) -> bytes:
    """A few KB on the wire, side² pixels once decoded."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def grey16_png(value: int, size=(200, 150)) -> bytes:
    return encode(Image.fromarray(np.full(size[::-1], value, np.uint16)), "PNG")


def mpo(size=(200, 150)) -> bytes:
    a, b = Image.new("RGB", size, (180, 120, 90)), Image.new("RGB", size, (20, 20, 20))
    return encode(a, "MPO", save_all=True, append_images=[b])


def bad_exif_png() -> bytes:
    """A PNG whose EXIF text chunk is not hex: Pillow raises ValueError while reading the orientation."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n 12\nzz not hex at all")
    return encode(Image.new("RGB", (64, 64)), "PNG", pnginfo=info)


def progressive_jpeg(size=(600, 450)) -> bytes:
    return encode(Image.new("RGB", size, (180, 120, 90)), "JPEG", progressive=True)


def scan_bomb(size=(600, 450), extra_scans: int = 1000, max_bytes: int | None = None) -> bytes:
    """A progressive JPEG whose second scan is repeated: every copy is decoded again over the whole
    coefficient buffer (the attack on libjpeg's progressive mode), up to `max_bytes` if given."""
    data = progressive_jpeg(size)
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    scan = data[starts[1] : starts[2]]
    if max_bytes is not None:
        extra_scans = (max_bytes - len(data)) // len(scan)
    return data[: starts[2]] + scan * extra_scans + data[starts[2] :]


def junk_before_first_scan(data: bytes, junk: bytes = b"\x00") -> bytes:
    """Bytes libjpeg skips between segments (it warns and goes on): they once stopped the scan count."""
    at = data.index(b"\xff\xda")
    return data[:at] + junk + data[at:]


def png_with_text(key: str, value: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return encode(Image.new("RGB", (64, 64)), "PNG", pnginfo=info)


def ztxt_bomb(chunks: int = 3) -> bytes:
    """A 64x48 PNG whose zTXt chunks inflate to 1 MB each from ~1 KB: Pillow inflates them on open."""
    import struct
    import zlib

    png = encode(Image.new("RGB", (64, 48)), "PNG")
    body = b"comment\x00\x00" + zlib.compress(b"\x00" * (1024 * 1024 - 16), 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    return png[:33] + chunk * chunks + png[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


def many_chunks_png(n: int = 50_000) -> bytes:
    import struct
    import zlib

    png = encode(Image.new("RGB", (64, 48)), "PNG")
    chunk = struct.pack(">I", 0) + b"teSt" + struct.pack(">I", zlib.crc32(b"teSt"))
    return png[:33] + chunk * n + png[33:]


def many_segments_jpeg(n: int = 50_000) -> bytes:
    jpeg = encode(Image.new("RGB", (64, 48)), "JPEG")
    return jpeg[:2] + b"\xff\xe3\x00\x02" * n + jpeg[2:]


def image_cases(jpeg: bytes, max_pixels: int) -> list[tuple[str, dict, dict, int, str]]:
    side = int(max_pixels**0.5) + 100
    image = {"image": ("a.jpg", jpeg, "image/jpeg")}
    return [
        ("tiny", {"image": ("t.png", encode(Image.new("RGB", (1, 1)), "PNG"))}, {}, 422, "at least 32 pixels"),
        ("sliver", {"image": ("s.png", encode(Image.new("RGB", (4000, 40)), "PNG"))}, {}, 422, "at most 4x"),
        ("1-bit bomb", {"image": ("b.png", one_bit_png(side))}, {}, 413, "over the limit"),
        ("tiff", {"image": ("x.tif", encode(Image.new("RGB", (64, 64)), "TIFF"))}, {}, 415, "unsupported image format"),
        ("bad exif", {"image": ("e.png", bad_exif_png())}, {}, 400, "corrupt"),
        (
            "html",
            {"image": ("x.png", b"<html><script>alert(1)</script></html>", "image/png")},
            {},
            400,
            "not a readable",
        ),
        ("deep json", image, {"metadata": "[" * 5000}, 422, "cannot be read"),
        ("huge int", image, {"metadata": '{"age": ' + "9" * 5000 + "}"}, 422, "cannot be read"),
        ("boolean age", image, {"metadata": '{"age": false}'}, 422, "not true/false"),
        ("nan age", image, {"metadata": '{"age": NaN}'}, 422, "age"),
        ("object site", image, {"metadata": '{"site": {"a": 1}}'}, 422, "must be a string"),
        ("null body", image, {"metadata": "null"}, 200, ""),
        ("scan bomb", {"image": ("p.jpg", scan_bomb(), "image/jpeg")}, {}, 400, "scans"),
        ("scan bomb, junk", {"image": ("p.jpg", junk_before_first_scan(scan_bomb()))}, {}, 400, "scans"),
        (
            "scan bomb, FF00",
            {"image": ("p.jpg", junk_before_first_scan(scan_bomb(), b"\xff\x00\xff\xff"))},
            {},
            400,
            "scans",
        ),
        ("png text key", {"image": ("t.png", png_with_text("lesion_full_size_pixels", "many"))}, {}, 200, ""),
        ("ztxt bomb", {"image": ("z.png", ztxt_bomb())}, {}, 400, "text chunks"),
        ("many png chunks", {"image": ("c.png", many_chunks_png())}, {}, 400, "segments or chunks"),
        ("many jpeg segments", {"image": ("s.jpg", many_segments_jpeg())}, {}, 400, "segments or chunks"),
        ("lone surrogate", image, {"metadata": '{"sex": "\\ud800"}'}, 422, "\\ud800"),
        ("forged log line", image, {"metadata": '{"sex": "x\\nINFO service.requests: FORGED"}'}, 422, "x\\nINFO"),
        ("huge prior int", image, {"prior": '{"akiec": ' + "9" * 4301 + "}"}, 422, "prior JSON cannot be read"),
        (
            "overflowing prior",
            image,
            {"prior": "{" + ", ".join(f'"{c}": 1{"0" * 400}' for c in CLASSES) + "}"},
            422,
            "finite",
        ),
        ("deep prior", image, {"prior": '{"a":' + "[" * 10_000}, 422, "prior JSON cannot be read"),
    ]
