"""Image decoding and the CNN's evaluation transform, shared by training and serving.

Training decodes every image once with `decode_image` + `resize_for_model` and caches the
uint8 result; its validation, OOF and export code then call `to_model_input`, exactly as the
service does for an upload. Training augmentations act on the cached uint8 images only.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from service.core.errors import ImageError, ImageShapeError, ImageTooLargeError, UnsupportedImageError

ALLOWED_FORMATS = {"JPEG", "MPO", "PNG"}  # MPO: the multi-picture JPEG many phones write (first picture used)
JPEG_FORMATS = {"JPEG", "MPO"}
MIN_SIDE = 32  # px; smaller is no dermoscopy image
MAX_ASPECT = 4.0  # longer side / shorter side
DEFAULT_MAX_PIXELS = 16_000_000
MAX_JPEG_SCANS = 64  # libjpeg's progressive script writes 10 (6 for grey), a baseline JPEG one per component
MAX_SEGMENTS = 20_000  # JPEG segments or PNG chunks: real files have tens (a large PNG ~ a thousand IDATs)
MAX_JPEG_FILL = 65_536  # fill or junk bytes between a JPEG's segments: encoders write none or a few; Pillow
#                         walks them at ~0.6 us a byte in Python (a 10 MB run: 6 s)

# Pillow warns once per malformed tag of EXIF or TIFF data (UserWarning): one 850 KB PNG wrote 65,000
# log lines. The data is skipped either way, and a bad EXIF is answered as such (decode_opened).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
# Pillow inflates a PNG's text chunks while reading its header, up to 64 MB an image by default: a
# batch of small such files could hold gigabytes before any pixel was counted. Text is never used here.
PngImagePlugin.MAX_TEXT_MEMORY = 2 * PngImagePlugin.MAX_TEXT_CHUNK


class ImageSpec(BaseModel):
    """How an image becomes CNN input. Saved in the bundle's manifest."""

    width: int = Field(ge=1, le=4096)
    height: int = Field(ge=1, le=4096)
    resize: str = "center-crop-to-aspect, bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("mean", "std")
    @classmethod
    def _in_range(cls, v: tuple[float, float, float], info: ValidationInfo) -> tuple[float, float, float]:
        low = 0.0 if info.field_name == "mean" else 1e-6
        if not all(math.isfinite(x) and low <= x <= 1.0 for x in v):
            raise ValueError(f"each {info.field_name} must be a finite number in [{low:g}, 1]")
        return v


def open_image(data: bytes, spec: ImageSpec | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read the header only, check format, shape and the pixels that decoding will produce.

    A JPEG much larger than the model input is set to decode at a reduced size (Pillow's draft
    mode, DCT scaling by 1/2, 1/4 or 1/8), so the pixel budget counts what is really decoded.
    Nothing is decoded here; `decode_opened` does that."""
    if not data:
        raise ImageError("the image file is empty")
    segments, scans, fill = file_structure(data, MAX_SEGMENTS, MAX_JPEG_SCANS)  # before Pillow walks them
    if segments > MAX_SEGMENTS:
        raise ImageError(f"the file has over {MAX_SEGMENTS} segments or chunks; no encoder writes that many")
    if fill > MAX_JPEG_FILL:
        raise ImageError(
            f"the JPEG has over {MAX_JPEG_FILL} bytes of fill or junk between its segments; no encoder writes that many"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("the file is not a readable image; send a JPEG or PNG") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the image is truncated or corrupt ({exc})") from None
    if img.format not in ALLOWED_FORMATS:
        raise UnsupportedImageError(f"unsupported image format {img.format}; send a JPEG or PNG")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageShapeError(f"image is {w}x{h} pixels; each side must be at least {MIN_SIDE} pixels")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageShapeError(f"image is {w}x{h} pixels; the longer side may be at most {MAX_ASPECT:g}x the shorter")
    scans = scans if img.format in JPEG_FORMATS else 0
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            f"the JPEG has over {MAX_JPEG_SCANS} scans; no camera or encoder writes that many (re-save it)"
        )
    if scans > 1:  # progressive (or multi-scan): libjpeg holds every DCT coefficient at full size, draft or not
        setattr(img, FULL_SIZE_PIXELS, w * h)  # an attribute: nothing in the file can set it (img.info it can)
    if spec is not None and img.format in JPEG_FORMATS:
        img.draft("RGB", draft_size(w, h, spec))
    if decoded_pixels(img) > max_pixels:
        why = " (a progressive JPEG decodes at full size: send a baseline JPEG or a smaller image)" if scans > 1 else ""
        raise ImageTooLargeError(
            f"image is {w}x{h} pixels and decodes to {decoded_pixels(img)} pixels, over the limit of {max_pixels}{why}"
        )
    return img


# `\xff\xff*`, not `\xff+`: a literal first byte lets `re` skip ahead fast over entropy-coded data.
# Each matches a whole run of FF bytes and, optionally, the byte after it: a run not followed by a
# marker still matches, and the walk goes on past it. (A required marker byte made `re` rescan the
# run from each of its bytes: a 40 KB run of FF took 15 s, holding the interpreter all along.)
JPEG_MARKER = re.compile(rb"\xff\xff*([^\x00\xff])?")  # fill bytes, then a marker; FF 00 and junk are skipped
JPEG_SCAN_END = re.compile(rb"\xff\xff*([^\x00\xd0-\xd7\xff])?")  # after entropy-coded data: not 00 or RSTn
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def next_marker(pattern: re.Pattern[bytes], data: bytes, pos: int) -> re.Match[bytes] | None:
    """The first run of FF bytes from `pos` that `pattern`'s marker byte follows, in linear time."""
    while (found := pattern.search(data, pos)) is not None:
        if found.group(1) is not None:
            return found
        pos = found.end()
    return None


def jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """A JPEG's markers in order, each with the fill and junk bytes skipped before it, walked as
    libjpeg does: junk between segments and fill bytes are skipped, each segment's length is jumped,
    and a scan's entropy-coded data is skipped to the next marker."""
    pos = 2
    while (found := next_marker(JPEG_MARKER, data, pos)) is not None:
        marker, skipped, pos = found.group(1)[0], found.start(1) - 1 - pos, found.end()
        yield marker, skipped
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            continue
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows, up to the next marker
            end = next_marker(JPEG_SCAN_END, data, pos)
            if end is None:
                return
            pos = end.start()


def file_structure(data: bytes, max_segments: int, max_scans: int) -> tuple[int, int, int]:
    """(segments of a JPEG or chunks of a PNG, scans in a JPEG's first image, fill and junk bytes
    between a JPEG's segments), counted in one walk up to `max_segments` + 1 and `max_scans` + 1;
    (0, 0, 0) for other files.

    Each scan of a progressive JPEG is decoded over the whole coefficient buffer, so a file that
    repeats one scan thousands of times costs minutes of CPU in a few MB (a "scan bomb"), and
    draft mode does not help: `open_image` counts those at full size instead. (An MPO's further
    pictures are never decoded: their scans do not count.)"""
    segments = scans = fill = 0
    if data.startswith(b"\xff\xd8"):
        first_image = True
        for marker, skipped in jpeg_markers(data):
            segments, fill = segments + 1, fill + skipped
            if marker == 0xD9:
                first_image = False
            elif marker == 0xDA and first_image:
                scans = min(scans + 1, max_scans + 1)
            if segments > max_segments:
                break
    elif data.startswith(PNG_SIGNATURE):
        pos = len(PNG_SIGNATURE)
        while segments <= max_segments and pos + 8 <= len(data):
            segments += 1
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return segments, scans, fill


DRAFT_OVERSAMPLING = 2  # decode at least this many pixels per model-input pixel, along each side
DRAFT_MIN_LONG_SIDE = 256  # and at least this many along the long side


def draft_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """The smallest size a JPEG may be DCT-scaled to: 2x the model input and at least 256 pixels
    along the long side, long side along long side.

    JPEG decoding can scale by 1/2, 1/4 or 1/8 almost for free: a 600x450 upload for a 128x96
    model decodes at 300x225, a quarter of the pixels; a 4000x3000 phone photo at 500x375, 1/64.
    Without the 256-pixel floor a 600x450 upload for a 64x48 model decoded at 150x113, half a grey
    level from full decoding on average, which changed 1.1 % of a smoke-trained bundle's answers;
    at 300x225 it is a tenth of a grey level (tests/core/test_decoding.py holds served top-1 agreement
    >= 99 %). For an image whose orientation differs from the model's (portrait, or turned by
    EXIF) the centre crop keeps less: a 450x600 upload for 128x96 decodes at 225x300 and crops to
    225x169, 1.76x."""
    long_, short = max(spec.width, spec.height), min(spec.width, spec.height)
    scale = max(DRAFT_OVERSAMPLING, DRAFT_MIN_LONG_SIDE / long_)
    size = (math.ceil(scale * long_), math.ceil(scale * short))
    return size if width >= height else size[::-1]


FULL_SIZE_PIXELS = "_lesion_full_size_pixels"  # set by open_image on a multi-scan JPEG


def decoded_pixels(img: Image.Image) -> int:
    """Pixels `decode_opened` will hold for an image from `open_image`."""
    return max(img.width * img.height, getattr(img, FULL_SIZE_PIXELS, 0))


def decode_opened(img: Image.Image) -> Image.Image:
    """Decode an image from `open_image` into RGB, EXIF orientation applied, 16-bit grey scaled to 8 bits."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageError(f"the image is truncated or corrupt ({exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception as exc:  # malformed EXIF raises many types in Pillow (ValueError, TypeError, IndexError, ...)
        raise ImageError(f"the image's EXIF data is corrupt ({type(exc).__name__}: {exc})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale PNG: 0..65535
        grey = np.asarray(img, dtype=np.uint32) // 257
        img = Image.fromarray(grey.astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, spec: ImageSpec | None = None) -> Image.Image:
    """Decode JPEG/PNG bytes into an RGB image with its EXIF orientation applied."""
    return decode_opened(open_image(data, spec, max_pixels))


def resize_for_model(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Center-crop to the target aspect ratio, then resize: HxWx3 uint8."""
    target_aspect = spec.width / spec.height
    w, h = img.size
    if abs(w / h - target_aspect) > 1e-3:
        if w / h > target_aspect:  # too wide: crop width
            new_w = round(h * target_aspect)
            left = (w - new_w) // 2
            img = img.crop((left, 0, left + new_w, h))
        else:
            new_h = round(w / target_aspect)
            top = (h - new_h) // 2
            img = img.crop((0, top, w, top + new_h))
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_for_model(data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes to the cached uint8 form (HxWx3) that `to_model_input` consumes."""
    return resize_for_model(decode_image(data, max_pixels, spec), spec)


def to_model_input(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 images (N,H,W,3) to normalised float32 CNN input (N,3,H,W)."""
    scaled = images.astype(np.float32) / np.float32(255.0)
    x = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
