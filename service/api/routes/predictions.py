"""POST /predict and POST /predict/batch: uploads + metadata -> the bundle's answer."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from service.api.dependencies import check_api_key, get_metrics, get_predictor, get_settings
from service.api.metrics import Metrics
from service.api.schemas import (
    BatchItem,
    BatchResponse,
    ErrorResponse,
    ModelRef,
    PredictionFields,
    PredictResponse,
)
from service.api.settings import BATCH_ROUTE, Settings
from service.core.metadata import EXAMPLE, ClinicalMetadata, metadata_from_json, metadata_list_from_json
from service.core.predictor import Prediction, Predictor
from service.core.preprocess import ImageError, load_for_model

ERRORS: dict[int | str, dict] = {code: {"model": ErrorResponse} for code in (400, 401, 411, 413, 415, 422, 503)}

router = APIRouter(tags=["predict"], responses=ERRORS, dependencies=[Depends(check_api_key)])


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"image file '{upload.filename}' is over the {settings.max_upload_bytes} byte limit")
    return data


def decode(data: bytes, name: str | None, predictor: Predictor, settings: Settings) -> np.ndarray:
    try:
        return load_for_model(data, predictor.manifest.preprocessing, settings.max_pixels)
    except ImageError as exc:
        raise type(exc)(f"image '{name}': {exc}") from None


def predict_uploads(
    uploads: list[tuple[bytes, str | None]],
    metas: list[ClinicalMetadata],
    predictor: Predictor,
    settings: Settings,
    metrics: Metrics,
    route: str,
) -> list[Prediction]:
    """Decode the uploads and run the whole stack once on them; CPU work, run in the thread pool."""
    batch = np.stack([decode(data, name, predictor, settings) for data, name in uploads])
    t0 = time.perf_counter()
    preds = predictor.predict(batch, metas)  # the CNN runs once on the whole batch
    metrics.inference.labels(route).observe(time.perf_counter() - t0)
    metrics.images.inc(len(preds))
    return preds


@router.post("/predict", response_model=PredictResponse)
async def predict(
    request: Request,
    image: UploadFile = File(..., description="JPEG or PNG dermoscopy image"),
    metadata: str | None = Form(None, description=f"JSON: {EXAMPLE}; each key optional"),
    predictor: Predictor = Depends(get_predictor),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
) -> PredictResponse:
    data = await read_upload(image, settings)
    meta = metadata_from_json(metadata, predictor.manifest.features)
    (pred,) = await run_in_threadpool(
        predict_uploads, [(data, image.filename)], [meta], predictor, settings, metrics, "/predict"
    )
    m = predictor.manifest
    fields = PredictionFields.from_prediction(pred, m).model_dump()
    return PredictResponse(**fields, model=ModelRef.of(m), request_id=request.state.request_id)


@router.post(BATCH_ROUTE, response_model=BatchResponse)
async def predict_batch(
    request: Request,
    images: list[UploadFile] = File(..., description="several JPEG or PNG images"),
    metadata: str | None = Form(None, description="JSON list, one metadata object per image, in order"),
    predictor: Predictor = Depends(get_predictor),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
) -> BatchResponse:
    if len(images) > settings.max_batch:
        raise HTTPException(413, f"{len(images)} images is over the batch limit of {settings.max_batch}")
    uploads = [(await read_upload(f, settings), f.filename) for f in images]
    metas = metadata_list_from_json(metadata, len(images), predictor.manifest.features)
    preds = await run_in_threadpool(predict_uploads, uploads, metas, predictor, settings, metrics, BATCH_ROUTE)
    m = predictor.manifest
    items = [BatchItem.from_prediction(p, m, filename=name) for (_, name), p in zip(uploads, preds)]
    return BatchResponse(predictions=items, model=ModelRef.of(m), request_id=request.state.request_id)
