"""The FastAPI app factory: `uvicorn service.app:create_app --factory` or `python -m service`.

The bundle is verified (sha256 of every file, format and library versions) before the app
accepts a connection; a bad bundle stops start-up with a one-line error. The onnxruntime
session, the unpickling and a warm-up inference then run in a thread while /health/ready
answers 503. Request CPU work runs in the thread pool; the loaded Predictor is read-only,
so requests run concurrently without a lock.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import swagger_ui
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.formparsers import MultiPartParser
from starlette.staticfiles import StaticFiles

from service.features import ClinicalMetadata
from service.manifest import Manifest
from service.observability import Metrics
from service.predictor import COMPONENTS, Prediction, Predictor, read_manifest, verify_bundle
from service.preprocess import ImageError, load_for_model
from service.schemas import BatchItem, BatchResponse, ErrorResponse, MetadataIn, ModelInfo, ModelRef, PredictResponse
from service.settings import Settings

log = logging.getLogger("service")
STATIC = Path(__file__).parent / "static"
SWAGGER_UI = Path(swagger_ui.__file__).parent / "static"  # swagger-ui-py ships Swagger UI 5
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 411, 413, 415, 422, 503)}


class ModelState:
    """The one piece of mutable state: the bundle, set once when loading finishes."""

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.manifest: Manifest | None = None
        self.error: str | None = None

    def load(self, settings: Settings) -> None:
        try:
            # the lifespan verified the bundle just before starting this thread
            predictor = Predictor.load(settings.bundle, intra_op_threads=settings.intra_op_threads(), verify=False)
            spec = predictor.manifest.preprocessing
            predictor.predict(np.full((1, spec.height, spec.width, 3), 128, np.uint8), [ClinicalMetadata()])  # warm-up
            self.predictor = predictor
            log.info("model %s loaded and warmed up", predictor.manifest.bundle_id)
        except Exception as exc:  # anything here means we must never report ready
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.error)


# ---- dependencies -------------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_predictor(request: Request) -> Predictor:
    state: ModelState = request.app.state.model
    if state.predictor is None:
        raise HTTPException(503, state.error and f"model failed to load: {state.error}" or "model is still loading")
    return state.predictor


def check_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    if settings.api_key and request.headers.get("x-api-key") != settings.api_key:
        raise HTTPException(401, "missing or wrong X-API-Key header")


# ---- request parsing ----------------------------------------------------------------------


def load_json_field(raw: str | None, hint: str = ""):
    """The `metadata` form field parsed as JSON; None when it is absent or blank."""
    if raw is None or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"metadata is not valid JSON ({exc.msg} at position {exc.pos}){hint}") from None


def parse_metadata(raw: str | None, manifest: Manifest) -> ClinicalMetadata:
    value = load_json_field(raw, hint='; send e.g. {"age": 55, "sex": "male", "site": "back"}')
    return ClinicalMetadata() if value is None else validate_metadata(value, manifest)


def parse_batch_metadata(raw: str | None, n: int, manifest: Manifest) -> list[ClinicalMetadata]:
    value = load_json_field(raw)
    if value is None:
        return [ClinicalMetadata() for _ in range(n)]
    if not isinstance(value, list) or len(value) != n:
        raise HTTPException(422, f"metadata must be a JSON list with one object per image ({n} images)")
    return [validate_metadata(v, manifest) for v in value]


def validate_metadata(value, manifest: Manifest) -> ClinicalMetadata:
    schema = manifest.metadata_schema
    if not isinstance(value, dict):
        raise HTTPException(400, 'metadata must be a JSON object, e.g. {"age": 55, "sex": "male", "site": "back"}')
    try:
        m = MetadataIn.model_validate(value)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            raise HTTPException(422, f"unknown metadata field '{field}'; allowed fields: age, sex, site") from None
        raise HTTPException(422, f"metadata field '{field}': {e['msg']}") from None
    if m.age is not None and (math.isnan(m.age) or not schema.age_min <= m.age <= schema.age_max):
        raise HTTPException(422, f"age {m.age:g} is outside {schema.age_min:g}-{schema.age_max:g}")
    sex = (m.sex or "unknown").strip().lower()
    site = (m.site or "unknown").strip().lower().replace("_", " ")
    if sex not in schema.sexes:
        raise HTTPException(422, f"sex '{m.sex}' is not allowed; use one of: {', '.join(schema.sexes)}")
    if site not in schema.sites:
        raise HTTPException(422, f"site '{m.site}' is not allowed; use one of: {', '.join(schema.sites)}")
    return ClinicalMetadata(age=m.age, sex=sex, site=site)


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"image file '{upload.filename}' is over the {settings.max_upload_bytes} byte limit")
    return data


def decode(data: bytes, name: str | None, predictor: Predictor, settings: Settings) -> np.ndarray:
    try:
        return load_for_model(data, predictor.manifest.preprocessing, settings.max_pixels)
    except ImageError as exc:
        raise HTTPException(exc.status, f"image '{name}': {exc}") from None


def predict_uploads(
    datas: list[bytes],
    names: list[str | None],
    metas: list[ClinicalMetadata],
    predictor: Predictor,
    settings: Settings,
    metrics: Metrics,
    route: str,
) -> list[Prediction]:
    """Decode the uploads and run the whole stack once on them; CPU work, run in the thread pool."""
    batch = np.stack([decode(d, n, predictor, settings) for d, n in zip(datas, names)])
    t0 = time.perf_counter()
    preds = predictor.predict(batch, metas)  # the CNN runs once on the whole batch
    metrics.inference.labels(route).observe(time.perf_counter() - t0)
    metrics.images.inc(len(preds))
    return preds


def prediction_fields(pred: Prediction, manifest: Manifest) -> dict:
    classes = manifest.classes

    def as_dict(p: np.ndarray) -> dict[str, float]:
        return {c: float(v) for c, v in zip(classes, p)}

    probs = as_dict(pred.probabilities)
    label = classes[int(np.argmax(pred.probabilities))]
    return {
        "label": label,
        "label_name": manifest.class_names[label],
        "probabilities": probs,
        "malignant_probability": float(sum(probs[c] for c in manifest.malignant_classes)),
        "components": {name: as_dict(pred.components[name]) for name in COMPONENTS},
    }


# ---- the app ------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Keep uploads in memory: never spool them to a temporary file on disk.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_request_bytes(settings))
    state, metrics = ModelState(), Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manifest = read_manifest(settings.bundle)  # BundleError: start-up fails, nothing is served
        verify_bundle(settings.bundle, manifest)
        state.manifest = manifest
        threading.Thread(target=state.load, args=(settings,), daemon=True, name="bundle-loader").start()
        yield

    app = FastAPI(
        title="Skin lesion classifier",
        version="1.0",
        description="ResNet-18 + XGBoost/LightGBM/CatBoost on clinical metadata, stacked. Research use only.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files: the docs page works offline
        redoc_url=None,
    )
    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI), name="docs-assets")
    app.state.settings, app.state.model, app.state.metrics = settings, state, metrics

    @app.middleware("http")
    async def observe(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if request.method == "POST" and length is None:
            response = error_response(411, "send a Content-Length header", request_id)
        elif length is not None and length.isdigit() and int(length) > max_request_bytes(settings, request.url.path):
            limit = max_request_bytes(settings, request.url.path)
            response = error_response(413, f"request body is over the {limit} byte limit", request_id)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        response.headers["X-Request-ID"] = request_id
        log.info(
            "%s %s %s %.1fms id=%s",
            request.method,
            path,
            response.status_code,
            1000 * (time.perf_counter() - start),
            request_id,
        )
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(request.state, "request_id", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"][1:]) or "request"
            parts.append(f"missing form field '{where}'" if e["type"] == "missing" else f"{where}: {e['msg']}")
        return error_response(422, "; ".join(parts), getattr(request.state, "request_id", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(
            500, "internal error; the request id is in the logs", getattr(request.state, "request_id", None)
        )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        if state.error:
            raise HTTPException(503, f"model failed to load: {state.error}")
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"], responses=ERRORS)
    async def ready(predictor: Predictor = Depends(get_predictor)) -> dict:
        return {"status": "ready", "bundle_id": predictor.manifest.bundle_id}

    @app.get("/model", response_model=ModelInfo, tags=["model"])
    async def model_info() -> ModelInfo:
        m = state.manifest
        return ModelInfo(
            bundle_id=m.bundle_id,
            created_at=m.created_at,
            classes=m.classes,
            class_names=m.class_names,
            malignant_classes=m.malignant_classes,
            metadata_schema=m.metadata_schema.model_dump(),
            preprocessing=m.preprocessing.model_dump(),
            components=COMPONENTS,
            metrics=m.metrics,
            training=m.training,
        )

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        tags=["predict"],
        responses=ERRORS,
        dependencies=[Depends(check_api_key)],
    )
    async def predict(
        request: Request,
        image: UploadFile = File(..., description="JPEG or PNG dermoscopy image"),
        metadata: str | None = Form(
            None, description='JSON: {"age": 55, "sex": "male", "site": "back"}; each key optional'
        ),
        predictor: Predictor = Depends(get_predictor),
        settings: Settings = Depends(get_settings),
    ) -> PredictResponse:
        data = await read_upload(image, settings)
        meta = parse_metadata(metadata, predictor.manifest)
        (pred,) = await run_in_threadpool(
            predict_uploads, [data], [image.filename], [meta], predictor, settings, metrics, "/predict"
        )
        m = predictor.manifest
        return PredictResponse(
            **prediction_fields(pred, m),
            model=ModelRef(bundle_id=m.bundle_id, created_at=m.created_at),
            request_id=request.state.request_id,
        )

    @app.post(
        "/predict/batch",
        response_model=BatchResponse,
        tags=["predict"],
        responses=ERRORS,
        dependencies=[Depends(check_api_key)],
    )
    async def predict_batch(
        request: Request,
        images: list[UploadFile] = File(..., description="several JPEG or PNG images"),
        metadata: str | None = Form(None, description="JSON list, one metadata object per image, in order"),
        predictor: Predictor = Depends(get_predictor),
        settings: Settings = Depends(get_settings),
    ) -> BatchResponse:
        if len(images) > settings.max_batch:
            raise HTTPException(413, f"{len(images)} images is over the batch limit of {settings.max_batch}")
        datas = [await read_upload(f, settings) for f in images]
        metas = parse_batch_metadata(metadata, len(images), predictor.manifest)
        names = [f.filename for f in images]
        preds = await run_in_threadpool(
            predict_uploads, datas, names, metas, predictor, settings, metrics, "/predict/batch"
        )
        m = predictor.manifest
        return BatchResponse(
            predictions=[BatchItem(filename=f.filename, **prediction_fields(p, m)) for f, p in zip(images, preds)],
            model=ModelRef(bundle_id=m.bundle_id, created_at=m.created_at),
            request_id=request.state.request_id,
        )

    return app


def max_request_bytes(settings: Settings, path: str = "/predict/batch") -> int:
    images = settings.max_batch if path == "/predict/batch" else 1
    return settings.max_upload_bytes * images + 1024 * 1024


def error_response(status: int, detail: str, request_id: str | None) -> JSONResponse:
    return JSONResponse({"detail": detail, "request_id": request_id}, status_code=status)
