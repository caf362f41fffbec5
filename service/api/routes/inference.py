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
ood_flagged BOOL [N], warnings BYTES [N] (a JSON list of sentences per image). Every value is the
one /predict gives for the same image, metadata and prior.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StringConstraints, ValidationError
from pydantic.types import Strict

from service.api.auth import api_key_header
from service.api.dependencies import MetricsDep, PredictorDep, SettingsDep, StateDep, not_serving
from service.api.errors import ApiError
from service.api.middleware import byte_count
from service.api.routes.predictions import answered, parse_prior, predict_uploads
from service.api.schemas import PredictionFields
from service.api.settings import BINARY_HEADER, Settings
from service.core.metadata import metadata_from_json
from service.core.predictor import Predictor

MODEL_NAME = "lesion"
EXTENSIONS = ["binary_tensor_data"]
router = APIRouter(prefix="/v2", tags=["open inference protocol"])


MAX_ELEMENTS = 1024  # elements of one JSON tensor, checked while parsing (LESION_MAX_BATCH bounds the images)
# JSON values a request may hold: each value after the first follows a ',', ':' or '[', so counting
# those bytes (strings included: an over-count) bounds the parse before it starts. Each value costs
# far more memory parsed than in the body (35x for a body of small numbers); the images are a few
# long base64 strings, and a metadata object a dozen values.
MAX_JSON_VALUES = 64 * MAX_ELEMENTS

Name = Annotated[str, StringConstraints(max_length=64)]
# a parameter's text; a prior's own bound, LESION_MAX_METADATA_BYTES, is checked with its 413
Text = Annotated[str, StringConstraints(max_length=64 * 1024)]
Scalar = StrictBool | StrictInt | StrictFloat | Text | None
Prevalences = Annotated[dict[Name, StrictInt | StrictFloat], Field(max_length=64)]
Parameters = Annotated[dict[Name, Scalar | Prevalences], Field(max_length=16)]
Atom = Annotated[str, Strict()] | StrictBool | StrictInt | StrictFloat
Element = Atom | Annotated[list[Atom], Field(max_length=MAX_ELEMENTS)]


class TensorIn(BaseModel):
    """An input tensor: its elements as values ([N]) or one-value rows ([N, 1]); nothing nests deeper
    (the route then takes BYTES only: strings)."""

    name: Name
    shape: list[StrictInt] = Field(min_length=1, max_length=2)
    datatype: Annotated[str, StringConstraints(max_length=16)]
    parameters: Parameters = Field(default_factory=dict)
    data: list[Element] | None = Field(None, max_length=MAX_ELEMENTS)


class OutputWanted(BaseModel):
    name: Name
    parameters: Annotated[dict[Name, Scalar], Field(max_length=4)] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = Field(None, max_length=256)
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1, max_length=8)
    outputs: list[OutputWanted] | None = Field(None, max_length=16)


OUTPUT_TYPES = {  # the one declaration of what the model answers: name -> datatype, each [N] ("probabilities": [N, C])
    "probabilities": "FP32",
    "label": "BYTES",
    "malignant_probability": "FP32",
    "ood_score": "FP32",
    "ood_flagged": "BOOL",
    "warnings": "BYTES",
}
OUTPUT_NAMES = list(OUTPUT_TYPES)


def outputs_of(predictor: Predictor) -> list[dict]:
    n = len(predictor.manifest.classes)
    return [
        {"name": name, "datatype": datatype, "shape": [-1, n] if name == "probabilities" else [-1]}
        for name, datatype in OUTPUT_TYPES.items()
    ]


INPUTS = [
    {"name": "image", "datatype": "BYTES", "shape": [-1]},
    {"name": "metadata", "datatype": "BYTES", "shape": [-1], "optional": True},
]


def bad(detail: str, status: int = 400) -> ApiError:
    return ApiError(status, "request-invalid", detail)


def the_model(name: str, version: str | None, predictor: Predictor) -> None:
    if name != MODEL_NAME:
        raise ApiError(404, "not-found", f"unknown model {name!r}: this service serves {MODEL_NAME!r}")
    if version is not None and version != predictor.manifest.bundle_id:
        raise ApiError(
            404, "not-found", f"model {name!r} has no version {version!r} (serving {predictor.manifest.bundle_id})"
        )


def split_body(body: bytearray, header: str | None, settings: Settings) -> tuple[InferRequest, memoryview]:
    """The JSON inference header and the binary tensor data after it (the binary extension; a view,
    not a copy of the body). The header's JSON values are counted before it is parsed; with the
    binary extension the header holds no image, so it is bounded as metadata (and its copy small)."""
    view = memoryview(body)
    if header is None:  # plain JSON: nothing refers to the body once parsed
        head: bytes | bytearray = body
        rest = memoryview(b"")
    else:
        size = byte_count(header)
        if size is None or size > len(body):
            raise bad(f"{BINARY_HEADER} must be a byte count no larger than the body ({len(body)} bytes)")
        if size > header_limit(settings):
            raise bad(f"the JSON header is over {header_limit(settings)} bytes: images go in the binary data", 413)
        head, rest = bytes(view[:size]), view[size:]  # the JSON header: small
    values = 1 + sum(head.count(c) for c in (b",", b":", b"["))
    if values > MAX_JSON_VALUES:
        raise bad(f"the inference request holds over {MAX_JSON_VALUES} JSON values; images go in few long strings", 413)
    try:
        return InferRequest.model_validate_json(head), rest
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "request"
        raise bad(f"the inference request is not valid JSON of the protocol: {where}: {e['msg']}") from None


def element_count(tensor: TensorIn, limit: int) -> int:
    """The tensor's element count from its shape, checked before any element is read."""
    if tensor.datatype != "BYTES":
        raise bad(f"input {tensor.name!r} must be BYTES, not {tensor.datatype}")
    if len(tensor.shape) == 2 and tensor.shape[1] != 1:
        raise bad(f"input {tensor.name!r} must have shape [N] or [N, 1], not {tensor.shape}")
    count = tensor.shape[0]
    if count < 1:
        raise bad(f"input {tensor.name!r} is empty (shape {tensor.shape})")
    if count > limit:
        raise bad(f"{count} elements in input {tensor.name!r}; at most {limit} images (LESION_MAX_BATCH)", 413)
    return count


def bytes_elements(tensor: TensorIn, binary: memoryview, offset: int, limit: int) -> tuple[list[bytes], int]:
    """A BYTES tensor's elements, from the binary data at `offset` (each a 4-byte little-endian length
    and its bytes) or from its JSON data (strings; the image's base64). Returns them and the next
    offset. At most `limit` elements are read, whatever the request claims."""
    count = element_count(tensor, limit)
    size = tensor.parameters.get("binary_data_size")
    out: list[bytes] = []
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise bad(f"input {tensor.name!r}: binary_data_size {size!r} does not fit the binary data")
        chunk, pos = binary[offset : offset + size], 0
        while len(out) < count:
            if pos + 4 > len(chunk):
                raise bad(
                    f"input {tensor.name!r}: shape {tensor.shape} but its binary data ends after {len(out)} elements"
                )
            (n,) = struct.unpack_from("<I", chunk, pos)
            if pos + 4 + n > len(chunk):
                raise bad(f"input {tensor.name!r}: a BYTES element is longer than its binary data")
            out.append(bytes(chunk[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos != len(chunk):
            raise bad(f"input {tensor.name!r}: binary_data_size {size} holds more than its {count} elements")
        offset += size
    elif tensor.data is not None:
        rows, tensor.data = tensor.data, None
        if len(rows) != count:
            raise bad(f"input {tensor.name!r} has shape {tensor.shape} but {len(rows)} elements")
        values = [v for row in rows for v in (row if isinstance(row, list) else [row])]
        del rows
        flat = [v for v in values if isinstance(v, str)]
        if len(flat) != count or len(values) != count:
            raise bad(f"input {tensor.name!r}: BYTES data in JSON must be {count} strings, as its shape says")
        del values
        flat.reverse()
        try:
            while flat:  # each string is freed as soon as it is decoded
                v = flat.pop()
                out.append(base64.b64decode(v, validate=True) if tensor.name == "image" else v.encode())
        except (binascii.Error, ValueError):
            raise bad("input 'image': in a JSON request each image is a base64 string") from None
        except UnicodeEncodeError:
            raise bad(f"input {tensor.name!r}: a string is not valid Unicode") from None
    else:
        raise bad(f"input {tensor.name!r} has neither data nor binary_data_size")
    return out, offset


def read_inputs(request: InferRequest, binary: memoryview, settings: Settings) -> tuple[list[bytes], list[str | None]]:
    """The request's images and metadata texts, every bound checked (runs in the thread pool)."""
    tensors: dict[str, list[bytes]] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name not in ("image", "metadata"):
            raise bad(f"unknown input {tensor.name!r}: this model takes 'image' and optionally 'metadata'")
        if tensor.name in tensors:
            raise bad(f"input {tensor.name!r} is given twice")
        tensors[tensor.name], offset = bytes_elements(tensor, binary, offset, settings.max_batch)
    if "image" not in tensors:
        raise bad("the request has no 'image' input")
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes of binary data follow the last tensor's binary_data_size")
    images = tensors["image"]
    for i, data in enumerate(images):
        if len(data) > settings.max_upload_bytes:
            raise bad(f"image {i} is over the {settings.max_upload_bytes} byte limit", 413)
    metas = tensors.get("metadata")
    if metas is not None and len(metas) != len(images):
        raise bad(f"{len(images)} images but {len(metas)} metadata entries")
    texts: list[str | None] = []
    for m in metas if metas is not None else [None] * len(images):
        if m is not None and len(m) > settings.max_metadata_bytes:
            raise bad(f"a metadata entry is over the {settings.max_metadata_bytes} byte limit", 413)
        try:
            texts.append(None if m is None else m.decode())
        except UnicodeDecodeError:
            raise bad("metadata entries must be UTF-8 JSON") from None
    return images, texts


def read_request(request: InferRequest, binary: memoryview, settings: Settings) -> tuple[list[bytes], list[str | None]]:
    """The request's images and metadata; refuses unknown or repeated outputs before any model work."""
    wanted = [o.name for o in request.outputs or []]
    unknown = [name for name in wanted if name not in OUTPUT_NAMES]
    if unknown:
        raise bad(f"unknown outputs {unknown}: this model gives {', '.join(OUTPUT_NAMES)}")
    if len(set(wanted)) != len(wanted):
        raise bad(f"outputs {wanted} name one output twice")
    return read_inputs(request, binary, settings)


def header_limit(settings: Settings) -> int:
    """The largest JSON header of a binary-extension request: metadata, parameters, no image."""
    return 2 * settings.max_batch * settings.max_metadata_bytes + 64 * 1024


def prior_text(request: InferRequest, settings: Settings) -> str | None:
    """The `prior` parameter as /predict's field takes it: a name, or a JSON object of prevalences."""
    prior = request.parameters.get("prior")
    if isinstance(prior, str) and len(prior.encode()) > settings.max_metadata_bytes:
        raise bad(f"the prior parameter is over the {settings.max_metadata_bytes} byte limit", 413)
    if prior is None or isinstance(prior, str):
        return prior
    if isinstance(prior, dict):
        return json.dumps(prior)
    raise bad(f"the prior parameter must be a name (balanced, training) or an object of prevalences, not {prior!r}")


async def read_body(request: Request) -> bytearray:
    """The body in one buffer this route alone holds (Request.body() would keep another reference in
    the request, so the buffer would outlive its parsing)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def tensors_out(answers: list[PredictionFields], predictor: Predictor) -> dict[str, tuple[str, np.ndarray]]:
    """Output name -> (datatype, array)."""
    classes = predictor.manifest.classes
    ood = [a.ood for a in answers]
    arrays = {
        "probabilities": np.array([[a.probabilities[c] for c in classes] for a in answers], np.float32),
        "label": np.array([a.label.encode() for a in answers], object),
        "malignant_probability": np.array([a.malignant_probability for a in answers], np.float32),
        "ood_score": np.array([o.score if o else math.nan for o in ood], np.float32),
        "ood_flagged": np.array([bool(o and o.flagged) for o in ood], bool),
        "warnings": np.array([json.dumps(a.warnings).encode() for a in answers], object),
    }
    return {name: (datatype, arrays[name]) for name, datatype in OUTPUT_TYPES.items()}


def serialize(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel())
    return np.ascontiguousarray(array).tobytes()


def json_data(datatype: str, array: np.ndarray) -> list:
    if datatype == "BYTES":
        return [v.decode() for v in array.ravel()]
    values = array.ravel().tolist()
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]  # JSON has no NaN


def respond(request: InferRequest, answers: list[PredictionFields], predictor: Predictor) -> Response:
    computed = tensors_out(answers, predictor)
    wanted = request.outputs or [OutputWanted(name=n) for n in computed]
    binary_default = request.parameters.get("binary_data_output") is True
    outputs, chunks = [], []
    for o in wanted:
        datatype, array = computed[o.name]
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(array.shape)}
        if o.parameters.get("binary_data", binary_default) is True:
            chunks.append(serialize(datatype, array))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = json_data(datatype, array)
        outputs.append(entry)
    body = {"model_name": MODEL_NAME, "model_version": predictor.manifest.bundle_id, "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    if not chunks:
        return JSONResponse(body)
    head = json.dumps(body).encode()
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={BINARY_HEADER: str(len(head))},
    )


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
        "outputs": outputs_of(predictor),
        "parameters": {"classes": predictor.manifest.classes, "prior": "balanced | training | JSON prevalences"},
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
    uploads: list[tuple[bytes, str | None]] = [(data, f"image[{i}]") for i, data in enumerate(images)]
    preds, decoded = await predict_uploads(uploads, metas, predictor, state, settings, metrics)
    answers = [
        PredictionFields.from_prediction(**answered(p, chosen, predictor, q)) for p, q in zip(preds, decoded.quality)
    ]
    return respond(infer_request, answers, predictor)
