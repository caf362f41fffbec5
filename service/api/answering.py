"""The answering layer between the routes and the core: uploads + metadata + prior -> answers.

Every prediction route (/predict, /predict/batch, the Open Inference Protocol's infer) reads its
request its own way, then calls `answer_uploads`: the images are decoded in the thread pool
(`decode_all`), queued for the micro-batcher's next model call, counted by the monitoring metrics,
and each prediction becomes a typed `Answer` (service/core/answers.py) under the request's prior.
The routes only format what comes back.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Semaphore

import numpy as np
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from service.api.errors import ApiError
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.api.state import ModelState
from service.core.answers import Answer, answer
from service.core.metadata import ClinicalMetadata, MetadataError, parse_json
from service.core.predictor import Predictor
from service.core.preprocess import (
    ImageError,
    ImageSpec,
    ImageTooLargeError,
    decode_opened,
    decoded_pixels,
    open_image,
    resize_for_model,
)
from service.core.priors import PriorError
from service.core.quality import quality_warnings

LARGE_DECODE = 4_000_000  # decoded pixels in a request above which freed memory is handed back
try:  # glibc's malloc_trim; absent elsewhere (musl, macOS), where nothing is trimmed
    LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
    LIBC.malloc_trim  # type: ignore[union-attr]  # noqa: B018
except (OSError, AttributeError):
    LIBC = None


@dataclass(frozen=True)
class Prior:
    """A request's class prior: its name for the answer, and what `Prediction.under_prior` takes
    (None: the probabilities stay as trained)."""

    name: str
    adjust: tuple[np.ndarray, float] | None


def parse_prior(raw: str | None, predictor: Predictor) -> Prior:
    """The `prior` field: balanced, training, or a JSON object of class prevalences (None or blank:
    the bundle's default)."""
    name = predictor.manifest.default_prior if raw is None or not raw.strip() else raw.strip()
    prior: str | dict = name
    if name.startswith("{"):
        try:
            prior = parse_json(name, "prior", '{"akiec": 0.03, "bcc": 0.05, ...}')
        except MetadataError as exc:
            raise ApiError(422, "prior-invalid", str(exc)) from None
        if not isinstance(prior, dict):
            raise ApiError(422, "prior-invalid", "prior: give a JSON object of class prevalences")
        name = "custom"
    try:
        return Prior(name, predictor.prior(prior))
    except PriorError as exc:
        raise ApiError(422, "prior-invalid", f"prior: {exc}") from None


def parse_triage_point(raw: str | None, predictor: Predictor) -> str | None:
    """The `triage_point` a request names (None or blank: the bundle's default); a name the bundle
    does not have is a 422 that lists the ones it has."""
    name = None if raw is None or not raw.strip() else raw.strip()
    triage = predictor.manifest.triage
    if name is None:
        return None
    if triage is None:
        raise ApiError(422, "triage-point-invalid", "triage_point: this bundle has no triage operating points")
    if name not in triage.names:
        allowed = ", ".join(triage.names)
        raise ApiError(
            422, "triage-point-invalid", f"triage_point {name[:64]!r} is not one of this bundle's: {allowed}"
        )
    return name


def named(name: str | None, exc: ImageError) -> ImageError:
    return type(exc)(f"image '{name}': {exc}")


@dataclass
class Decoded:
    """A request's uploads, ready for the model: the images that decoded, and why the others did not."""

    images: np.ndarray  # (K,H,W,3) uint8 at the model's input size, the decoded uploads in order
    quality: list[list[str]]  # each decoded image's quality warnings (these read the sizes as sent)
    positions: list[int]  # each decoded image's position among the uploads
    refused: dict[int, ImageError]  # position -> why that upload is not an image the model can read


def decode_all(
    uploads: Sequence[tuple[bytes, str | None]],
    spec: ImageSpec,
    slots: Semaphore,
    settings: Settings,
    each: bool = False,
) -> Decoded:
    """Headers first: every image's decoded pixels are counted against the per-image and per-request
    budgets before any is decoded. Then one image at a time, at most `decode_slots` at once per worker,
    and the quality checks on the whole request (here, in the thread pool, not on the event loop).

    A bad upload raises its ImageError, or with `each` (a batch) is set aside in `refused` while
    the others go on; the per-request pixel budget always holds for the whole request."""
    opened: dict[int, Image.Image] = {}
    refused: dict[int, ImageError] = {}

    def refuse(i: int, exc: ImageError) -> None:
        if not each:
            raise named(uploads[i][1], exc) from None
        refused[i] = exc

    for i, (data, _) in enumerate(uploads):
        try:
            opened[i] = open_image(data, spec, settings.max_pixels)
        except ImageError as exc:
            refuse(i, exc)
    sizes = {i: img.size for i, img in opened.items()}
    total = sum(decoded_pixels(img) for img in opened.values())
    if total > settings.max_request_pixels:
        raise ImageTooLargeError(
            f"the images decode to {total} pixels, over the per-request limit of {settings.max_request_pixels}"
        )
    decoded: dict[int, np.ndarray] = {}
    try:
        for i in list(opened):
            with slots:
                try:
                    decoded[i] = resize_for_model(decode_opened(opened.pop(i)), spec)  # the full image freed at once
                except ImageError as exc:
                    refuse(i, exc)
    finally:
        if total > LARGE_DECODE:
            opened.clear()
            release_freed_memory()  # refused or not
    positions = sorted(decoded)
    out = (
        np.stack([decoded[i] for i in positions]) if positions else np.empty((0, spec.height, spec.width, 3), np.uint8)
    )
    quality = quality_warnings(out, [sizes[i] for i in positions], (spec.width, spec.height)) if positions else []
    return Decoded(out, quality, positions, refused)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and RSS stays at the burst's peak)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


@dataclass
class Answers:
    """What a request's uploads got: an answer for each one the model read, why the others got none."""

    answers: dict[int, Answer]  # upload position -> its answer
    refused: dict[int, ImageError]  # upload position -> why it could not be read
    images: np.ndarray  # the answered uploads as the model saw them, in position order (for explanations)


async def answer_uploads(
    uploads: Sequence[tuple[bytes, str | None]],
    metas: Sequence[ClinicalMetadata],
    prior: Prior,
    point: str | None,
    predictor: Predictor,
    state: ModelState,
    settings: Settings,
    metrics: Metrics,
    each: bool = False,
) -> Answers:
    """Decode the uploads in the thread pool (a bad one raises its ImageError, or with `each` is set
    aside), queue the decoded ones for the micro-batcher's next model call on `predictor` (the bundle
    this request started with answers it, even across a swap), count them in the monitoring metrics
    (as trained, whatever the prior), and answer each under `prior`, triaged at `point` (None: the
    bundle's default; `parse_triage_point` checked it)."""
    assert state.batcher is not None
    m = predictor.manifest
    decoded = await run_in_threadpool(decode_all, uploads, m.preprocessing, state.decode_slots, settings, each)
    if not decoded.positions:
        return Answers({}, decoded.refused, decoded.images)
    preds = await state.batcher.submit(predictor, decoded.images, [metas[i] for i in decoded.positions])
    metrics.observe_answers(m, preds, decoded.quality, decoded.images)
    answers = {
        i: answer(m, p, prior.name, prior.adjust, q, point)
        for i, p, q in zip(decoded.positions, preds, decoded.quality)
    }
    metrics.observe_triage(m, answers.values())
    return Answers(answers, decoded.refused, decoded.images)
