"""The Open Inference Protocol (KServe's v2 REST protocol, which KServe, Triton, Seldon MLServer and
TorchServe speak) beside the service's own routes. It shares their predictor, micro-batcher, limits,
API key and error handling; its errors are the protocol's {"error": "..."} (service/api/errors.py).

One model, `lesion`; its version is the bundle id (a versioned route naming another answers 404).
POST /v2/models/lesion/infer takes N images (at most LESION_MAX_BATCH):
  image     BYTES [N]  the JPEG or PNG files: raw, with the binary tensor data extension (what
                       tritonclient sends), or base64 strings in a plain JSON request
  metadata  BYTES [N]  optional: one JSON object per image, as /predict's metadata field. One
                       tensor of JSON objects rather than a tensor per field: the same schema and
                       validation as /predict, and a field may be left out
and the request parameter `prior` (as /predict's field). It answers, for every output unless
`outputs` names some: probabilities FP32 [N, C] (the served model, classes in GET /model's order),
label BYTES [N], malignant_probability FP32 [N], ood_score FP32 [N] (the CNN's; NaN without one),
ood_flagged BOOL [N], warnings BYTES [N] (a JSON list of sentences per image), triage BYTES [N] (a
JSON object per image, as /predict's `triage`; the request parameter `triage_point` names the
operating point, as /predict's field). Every value is the
one /predict gives for the same image, metadata and prior.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service.api.answering import answer_uploads, parse_prior, parse_triage_point
from service.api.auth import api_key_header
from service.api.dependencies import MetricsDep, PredictorDep, SettingsDep, StateDep, not_serving
from service.api.errors import CLOSE, ApiError
from service.api.settings import BINARY_HEADER
from service.api.tensors import (
    INPUTS,
    MODEL_NAME,
    InferRequest,
    outputs_of,
    prior_text,
    read_request,
    respond,
    split_body,
    text_parameter,
)
from service.core.metadata import metadata_from_json
from service.core.predictor import Predictor

EXTENSIONS = ["binary_tensor_data"]
router = APIRouter(prefix="/v2", tags=["open inference protocol"])


def the_model(name: str, version: str | None, predictor: Predictor) -> None:
    if name != MODEL_NAME:
        raise ApiError(404, "not-found", f"unknown model {name!r}: this service serves {MODEL_NAME!r}")
    if version is not None and version != predictor.manifest.bundle_id:
        raise ApiError(
            404, "not-found", f"model {name!r} has no version {version!r} (serving {predictor.manifest.bundle_id})"
        )


async def read_body(request: Request) -> bytearray:
    """The body in one buffer this route alone holds (Request.body() would keep another reference in
    the request, so the buffer would outlive its parsing)."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
    except ClientDisconnect:  # a 400 nobody reads, as the form routes give, not an internal error
        raise ApiError(
            400, "request-invalid", "the client closed the connection before its body ended", CLOSE
        ) from None
    return body


@router.get("", summary="server metadata")
async def server_metadata(request: Request) -> dict:
    return {"name": "skin-lesion-classifier", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="the process is up")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="a model is loaded and serving", responses={503: {"description": "not ready"}})
async def ready(state: StateDep) -> JSONResponse:
    up = not_serving(state) is None
    return JSONResponse({"ready": up}, status_code=200 if up else 503)


@router.get("/models/{name}", summary="model metadata", dependencies=[Security(api_key_header)])
@router.get("/models/{name}/versions/{version}", summary="model metadata", dependencies=[Security(api_key_header)])
async def model_metadata(name: str, predictor: PredictorDep, version: str | None = None) -> dict:
    the_model(name, version, predictor)
    return {
        "name": MODEL_NAME,
        "versions": [predictor.manifest.bundle_id],
        "platform": "onnxruntime+" + "+".join(b.name for b in predictor.manifest.boosters),
        "inputs": INPUTS,
        "outputs": outputs_of(predictor.manifest),
        "parameters": {
            "classes": predictor.manifest.classes,
            "prior": "balanced | training | JSON prevalences",
            "triage_point": predictor.manifest.triage.names if predictor.manifest.triage else [],
        },
    }


@router.get("/models/{name}/ready", summary="the model is ready", dependencies=[Security(api_key_header)])
@router.get(
    "/models/{name}/versions/{version}/ready", summary="the model is ready", dependencies=[Security(api_key_header)]
)
async def model_ready(name: str, predictor: PredictorDep, version: str | None = None) -> dict:
    the_model(name, version, predictor)
    return {"name": MODEL_NAME, "ready": True}


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferRequest.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the binary tensor data extension: JSON header ({BINARY_HEADER} bytes), then the tensors",
            },
        },
    }
}


@router.post(
    "/models/{name}/infer", summary="inference", openapi_extra=INFER_BODY, dependencies=[Security(api_key_header)]
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="inference",
    openapi_extra=INFER_BODY,
    dependencies=[Security(api_key_header)],
)
async def infer(
    name: str,
    request: Request,
    predictor: PredictorDep,
    state: StateDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    version: str | None = None,
) -> Response:
    the_model(name, version, predictor)
    body = await read_body(request)
    infer_request, binary = await run_in_threadpool(split_body, body, request.headers.get(BINARY_HEADER), settings)
    del body  # a JSON body is freed here, before its base64 strings are decoded
    images, texts = await run_in_threadpool(read_request, infer_request, binary, settings)
    del binary  # the binary extension's body is freed here: its images are copies
    features = predictor.manifest.features
    metas = [metadata_from_json(t, features) for t in texts]  # MetadataError: 400 in this protocol
    chosen = parse_prior(prior_text(infer_request, settings), predictor)
    point = parse_triage_point(text_parameter(infer_request, "triage_point"), predictor)
    uploads: list[tuple[bytes, str | None]] = [(data, f"image[{i}]") for i, data in enumerate(images)]
    got = await answer_uploads(uploads, metas, chosen, point, predictor, state, settings, metrics)
    return respond(infer_request, [got.answers[i] for i in range(len(uploads))], predictor.manifest)
