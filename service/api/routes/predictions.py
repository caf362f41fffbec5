"""POST /predict and POST /predict/batch: uploads + metadata -> the bundle's answer."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from threading import Semaphore

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from service.api.auth import api_key_header
from service.api.dependencies import MetricsDep, PredictorDep, SettingsDep, StateDep
from service.api.errors import ApiError
from service.api.logs import printable
from service.api.metrics import Metrics
from service.api.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    ExplanationOut,
    ModelRef,
    PredictResponse,
    image_warnings,
    lesion_answers,
    lesion_ids_from_json,
    notice_for,
    problem_responses,
)
from service.api.settings import BATCH_ROUTE, Settings
from service.api.state import ModelState
from service.core.features import FeatureSpec
from service.core.metadata import (
    EXAMPLE,
    ClinicalMetadata,
    MetadataError,
    metadata_from_json,
    metadata_json_schema,
    metadata_objects_from_json,
    parse_json,
    validate_metadata,
)
from service.core.predictor import Prediction, Predictor
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

ERRORS = problem_responses(
    {
        400: "image-invalid, request-invalid (a form that cannot be parsed, too many files)",
        401: "unauthorized",
        408: "body-timeout",
        413: "image-too-large, field-too-large, body-too-large",
        415: "image-unsupported",
        422: "metadata-invalid, prior-invalid, lesion-ids-invalid, image-shape, explain-unavailable, request-invalid",
        503: "busy (past the worker's in-flight bounds; Retry-After), not-ready",
    }
)

LARGE_DECODE = 4_000_000  # decoded pixels in a request above which freed memory is handed back
try:  # glibc's malloc_trim; absent elsewhere (musl, macOS), where nothing is trimmed
    LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
    LIBC.malloc_trim  # type: ignore[union-attr]  # noqa: B018
except (OSError, AttributeError):
    LIBC = None

router = APIRouter(tags=["predict"], responses=ERRORS, dependencies=[Security(api_key_header)])


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """The file's bytes; the parser's buffer is freed at once (one copy of each upload, not two)."""
    data = await upload.read(settings.max_upload_bytes + 1)
    await upload.close()
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413, "image-too-large", f"image file {upload.filename!r} is over the {settings.max_upload_bytes} byte limit"
        )
    return data


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
    uploads: list[tuple[bytes, str | None]], spec: ImageSpec, slots: Semaphore, settings: Settings, each: bool = False
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


def check_metadata_size(raw: str | None, settings: Settings, name: str = "metadata") -> None:
    if raw is not None and len(raw.encode()) > settings.max_metadata_bytes:
        raise ApiError(413, "field-too-large", f"the {name} field is over the {settings.max_metadata_bytes} byte limit")


def parse_prior(raw: str | None, predictor: Predictor) -> tuple[str, tuple[np.ndarray, float] | None]:
    """The `prior` field: balanced, training, or a JSON object of class prevalences (None: the bundle's
    default). Returns its name for the response and what `Prediction.under_prior` takes."""
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
        return name, predictor.prior(prior)
    except PriorError as exc:
        raise ApiError(422, "prior-invalid", f"prior: {exc}") from None


async def predict_uploads(
    uploads: list[tuple[bytes, str | None]],
    metas: list[ClinicalMetadata],
    predictor: Predictor,
    state: ModelState,
    settings: Settings,
    metrics: Metrics,
    each: bool = False,
) -> tuple[list[Prediction], Decoded]:
    """Decode the uploads in the thread pool, then queue the decoded ones for the micro-batcher's
    next model call on `predictor` (the bundle this request started with answers it, even across a
    swap). Their predictions come back in `decoded.positions` order, counted by the monitoring metrics."""
    assert state.batcher is not None
    spec = predictor.manifest.preprocessing
    decoded = await run_in_threadpool(decode_all, uploads, spec, state.decode_slots, settings, each)
    if not decoded.positions:
        return [], decoded
    preds = await state.batcher.submit(predictor, decoded.images, [metas[i] for i in decoded.positions])
    metrics.observe_answers(predictor.manifest, preds, decoded.quality, decoded.images)
    return preds, decoded


def answered(
    pred: Prediction, prior: tuple[str, tuple[np.ndarray, float] | None], predictor: Predictor, quality: list[str]
) -> dict:
    """A prediction under the request's prior, with its warnings: the fields every answer shares."""
    name, adjust = prior
    m = predictor.manifest
    moved = pred if adjust is None else pred.under_prior(*adjust)
    return dict(pred=moved, manifest=m, prior=name, warnings=image_warnings(pred, m, quality))


PRIOR_HELP = (
    "class prior of the returned probabilities: balanced (as trained), training (the training data's class "
    'shares), or a JSON object of prevalences such as {"akiec": 0.03, ...} for every class; default: the bundle\'s'
)


METADATA_DOC = {  # the metadata field is JSON text: its schema (no contentMediaType: Swagger UI shows that as a file)
    "contentSchema": metadata_json_schema(FeatureSpec()),
    "example": EXAMPLE,
}


@router.post("/predict", response_model=PredictResponse)
async def predict(
    request: Request,
    predictor: PredictorDep,
    state: StateDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    image: UploadFile = File(..., description="JPEG or PNG dermoscopy image"),
    metadata: str | None = Form(
        None,
        description=f"JSON object: {EXAMPLE}; each key optional (the served bundle's values: GET /model)",
        json_schema_extra=METADATA_DOC,
    ),
    prior: str = Form("", description=PRIOR_HELP),
    explain: bool = Form(False, description="add a heatmap and metadata attributions (costs a second model pass)"),
    explain_query: bool = Query(False, alias="explain", description="the same as the form field"),
) -> PredictResponse:
    check_metadata_size(metadata, settings)
    check_metadata_size(prior, settings, "prior")
    data = await read_upload(image, settings)
    meta = metadata_from_json(metadata, predictor.manifest.features)
    chosen = parse_prior(prior, predictor)
    explain = explain or explain_query
    if explain and not predictor.manifest.cnn.can_explain:
        raise ApiError(
            422,
            "explain-unavailable",
            "explain: this bundle's CNN graph has no heatmap output (retrain or re-export it)",
        )
    (pred,), decoded = await predict_uploads([(data, image.filename)], [meta], predictor, state, settings, metrics)
    m = predictor.manifest
    fields = answered(pred, chosen, predictor, decoded.quality[0])
    explanation = None
    if explain:
        label = m.classes[int(np.argmax(fields["pred"].probabilities))]  # the answer as returned (under its prior)
        (e,) = await run_in_threadpool(predictor.explain, decoded.images, [meta], [label])
        explanation = ExplanationOut.of(e)
    return PredictResponse.from_prediction(
        **fields,
        explanation=explanation,
        model=ModelRef.of(m),
        request_id=request.state.request_id,
        notice=notice_for(m),
    )


@router.post(BATCH_ROUTE, response_model=BatchResponse)
async def predict_batch(
    request: Request,
    predictor: PredictorDep,
    state: StateDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    images: list[UploadFile] = File(
        ...,
        description="several JPEG or PNG images; one that cannot be read gets its own error entry, the others an answer",
    ),
    metadata: str | None = Form(
        None,
        description="JSON list, one metadata object (as for /predict) per image, in order",
        json_schema_extra={
            "contentSchema": {"type": "array", "items": METADATA_DOC["contentSchema"]},
            "example": f"[{EXAMPLE}]",
        },
    ),
    prior: str = Form("", description=PRIOR_HELP),
    lesion_ids: str | None = Form(
        None,
        description="JSON list, one lesion id (a string, or null) per image, in order: the images of one lesion "
        "also get one combined answer in `lesions` (the bundle's lesion rule, GET /model)",
        json_schema_extra={"example": '["lesion-1", "lesion-1", null]'},
    ),
) -> BatchResponse:
    check_metadata_size(metadata, settings)
    check_metadata_size(prior, settings, "prior")
    check_metadata_size(lesion_ids, settings, "lesion_ids")
    ids = lesion_ids_from_json(lesion_ids, len(images))
    uploads = [(await read_upload(f, settings), printable(f.filename or "", 300) or None) for f in images]
    features = predictor.manifest.features
    metas = metadata_objects_from_json(metadata, len(images))
    chosen = parse_prior(prior, predictor)
    refused: dict[int, ImageError | MetadataError] = {}
    valid: list[ClinicalMetadata] = []
    for i, value in enumerate(metas):
        try:
            valid.append(validate_metadata(value, features))
        except MetadataError as exc:
            refused[i] = exc
            valid.append(ClinicalMetadata())
    usable = [i for i in range(len(uploads)) if i not in refused]
    preds, decoded = await predict_uploads(
        [uploads[i] for i in usable], [valid[i] for i in usable], predictor, state, settings, metrics, each=True
    )
    refused.update({usable[j]: exc for j, exc in decoded.refused.items()})
    answers = {usable[j]: (p, q) for j, p, q in zip(decoded.positions, preds, decoded.quality)}
    m = predictor.manifest
    items: list[BatchItem | BatchItemError] = []
    for i, (_, name) in enumerate(uploads):
        if i in refused:
            items.append(BatchItemError.of(name, refused[i]))
        else:
            pred, quality = answers[i]
            items.append(BatchItem.from_prediction(**answered(pred, chosen, predictor, quality), filename=name))
    return BatchResponse(
        predictions=items,
        lesions=None if ids is None else lesion_answers(ids, items, m),
        model=ModelRef.of(m),
        request_id=request.state.request_id,
        notice=notice_for(m),
    )
