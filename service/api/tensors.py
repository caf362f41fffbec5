"""The Open Inference Protocol's encoding (KServe's v2 REST protocol): the request's JSON and the
binary tensor data extension in, every bound checked before the work it bounds; the model's outputs
(one table, `OUTPUTS`) out, as JSON data or binary tensor data. The route is
service/api/routes/inference.py."""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StringConstraints, ValidationError
from pydantic.types import Strict

from service.api.errors import ApiError
from service.api.middleware import byte_count
from service.api.schemas import TriageOut
from service.api.settings import BINARY_HEADER, Settings
from service.core.answers import Answer
from service.core.manifest import Manifest

MODEL_NAME = "lesion"


MAX_ELEMENTS = 1024  # elements of one JSON tensor, checked while parsing (LESION_MAX_BATCH bounds the images)
# JSON values a request may hold: each value after the first follows a ',', ':' or '[', so counting
# those bytes (strings included: an over-count) bounds the parse before it starts. Each value costs
# far more memory parsed than in the body (35x for a body of small numbers); the images are a few
# long base64 strings, and a metadata object a dozen values.
MAX_JSON_VALUES = 64 * MAX_ELEMENTS
PIECE = 1 << 20  # bytes a large body is scanned or decoded by per call: each holds the GIL ~1-7 ms, not 100

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


@dataclass(frozen=True)
class Output:
    """One output of the model: its datatype, whether it has a column per class ([N, C], else [N]),
    and how it reads an answer."""

    datatype: Literal["FP32", "BOOL", "BYTES"]
    per_class: bool
    value: Callable[[Answer], Any]


OUTPUTS: dict[str, Output] = {  # the one table of what the model answers, in the order it answers
    "probabilities": Output("FP32", True, lambda a: a.probabilities),
    "label": Output("BYTES", False, lambda a: a.label.encode()),
    "malignant_probability": Output("FP32", False, lambda a: a.malignant_probability),
    "ood_score": Output("FP32", False, lambda a: math.nan if a.ood is None else a.ood.score),
    "ood_flagged": Output("BOOL", False, lambda a: a.ood_flagged),
    "warnings": Output("BYTES", False, lambda a: json.dumps(a.warnings).encode()),
    "triage": Output("BYTES", False, lambda a: triage_json(a).encode()),
}


def triage_json(a: Answer) -> str:
    """An answer's triage as /predict's `triage` field gives it (JSON null: the bundle has no operating points)."""
    return "null" if a.triage is None else TriageOut.of(a.triage).model_dump_json()


DTYPES = {"FP32": np.float32, "BOOL": np.bool_, "BYTES": object}


def outputs_of(manifest: Manifest) -> list[dict]:
    """The outputs as model metadata declares them (-1: any number of images)."""
    n = len(manifest.classes)
    return [
        {"name": name, "datatype": o.datatype, "shape": [-1, n] if o.per_class else [-1]} for name, o in OUTPUTS.items()
    ]


INPUTS = [
    {"name": "image", "datatype": "BYTES", "shape": [-1]},
    {"name": "metadata", "datatype": "BYTES", "shape": [-1], "optional": True},
]


def bad(detail: str, status: int = 400) -> ApiError:
    return ApiError(status, "request-invalid", detail)


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
    values = 1 + sum(head.count(c, i, i + PIECE) for i in range(0, len(head), PIECE) for c in (b",", b":", b"["))
    if values > MAX_JSON_VALUES:
        raise bad(f"the inference request holds over {MAX_JSON_VALUES} JSON values; images go in few long strings", 413)
    try:
        return InferRequest.model_validate_json(head), rest
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "request"
        raise bad(f"the inference request is not valid JSON of the protocol: {where}: {e['msg']}") from None


def b64decode_in_pieces(text: str) -> bytes:
    """Strict base64 decoded a piece at a time (pieces of whole 4-character groups), so the event loop
    answers health probes while a large JSON request decodes: one 10 MB image in one call held the GIL
    ~70 ms. Padding is allowed at the very end only. It accepts nothing the whole-string decoding
    refuses (a stray '=' past a piece's end, which that decoding tolerates, it refuses)."""
    pieces = []
    for i in range(0, len(text), PIECE):
        piece = text[i : i + PIECE]
        if i + PIECE < len(text) and piece.endswith("="):
            raise binascii.Error("padding before the end of the string")
        pieces.append(base64.b64decode(piece, validate=True))
    return b"".join(pieces)


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
                out.append(b64decode_in_pieces(v) if tensor.name == "image" else v.encode())
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
    unknown = [name for name in wanted if name not in list(OUTPUTS)]
    if unknown:
        raise bad(f"unknown outputs {unknown}: this model gives {', '.join(list(OUTPUTS))}")
    if len(set(wanted)) != len(wanted):
        raise bad(f"outputs {wanted} name one output twice")
    return read_inputs(request, binary, settings)


def header_limit(settings: Settings) -> int:
    """The largest JSON header of a binary-extension request: metadata, parameters, no image."""
    return 2 * settings.max_batch * settings.max_metadata_bytes + 64 * 1024


def text_parameter(request: InferRequest, name: str) -> str | None:
    """A request parameter that must be text (absent: None)."""
    value = request.parameters.get(name)
    if value is None or isinstance(value, str):
        return value
    raise bad(f"the {name} parameter must be a string, not {value!r}")


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


def tensors_out(answers: list[Answer]) -> dict[str, np.ndarray]:
    """Output name -> its array, every output of `OUTPUTS`."""
    return {name: np.array([o.value(a) for a in answers], DTYPES[o.datatype]) for name, o in OUTPUTS.items()}


def serialize(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel())
    return np.ascontiguousarray(array).tobytes()


def json_data(datatype: str, array: np.ndarray) -> list:
    if datatype == "BYTES":
        return [v.decode() for v in array.ravel()]
    values = array.ravel().tolist()
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]  # JSON has no NaN


def respond(request: InferRequest, answers: list[Answer], manifest: Manifest) -> Response:
    """The protocol's response: the outputs asked for (every one by default), each as JSON data or
    binary tensor data, as the request's parameters say."""
    computed = tensors_out(answers)
    wanted = request.outputs or [OutputWanted(name=n) for n in computed]
    binary_default = request.parameters.get("binary_data_output") is True
    outputs, chunks = [], []
    for o in wanted:
        datatype, array = OUTPUTS[o.name].datatype, computed[o.name]
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(array.shape)}
        if o.parameters.get("binary_data", binary_default) is True:
            chunks.append(serialize(datatype, array))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = json_data(datatype, array)
        outputs.append(entry)
    body = {"model_name": MODEL_NAME, "model_version": manifest.bundle_id, "outputs": outputs}
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
