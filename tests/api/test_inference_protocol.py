"""The Open Inference Protocol routes (service/api/routes/inference.py): Triton's own HTTP client
against a live service, and the protocol's errors, JSON form and access rules in process."""

from __future__ import annotations

import base64
import binascii
import json
import struct

import httpx
import numpy as np
import pytest

from service.api.tensors import PIECE, b64decode_in_pieces
from tests.helpers import metric_total, sample_images

META = {"age": 55, "sex": "female", "site": "back"}


def infer_inputs(images: list[bytes], metas: list[dict] | None = None, binary: bool = True):
    import tritonclient.http as triton

    image = triton.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    inputs = [image]
    if metas is not None:
        meta = triton.InferInput("metadata", [len(metas)], "BYTES")
        meta.set_data_from_numpy(np.array([json.dumps(m).encode() for m in metas], dtype=object), binary_data=binary)
        inputs.append(meta)
    return inputs


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as triton

    return triton.InferenceServerClient(server.removeprefix("http://"))


@pytest.mark.scenario
def test_triton_client_sees_a_live_ready_model_and_its_metadata(triton, server):
    model = httpx.get(server + "/model").json()
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("lesion")
    assert triton.is_model_ready("lesion", model["bundle_id"])
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata("lesion")
    assert (
        meta["versions"] == [model["bundle_id"]] == triton.get_model_metadata("lesion", model["bundle_id"])["versions"]
    )
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("image", "BYTES"), ("metadata", "BYTES")]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, len(model["classes"])]) and outputs["ood_flagged"][0] == "BOOL"
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_model_metadata("resnet50")
    with pytest.raises(InferenceServerException, match="no version"):
        triton.get_model_metadata("lesion", "an-old-bundle")


@pytest.mark.scenario
@pytest.mark.parametrize("n", [1, 3])
def test_triton_client_gets_what_predict_answers(triton, server, sample_dir, n):
    images = [p.read_bytes() for p in sample_images(sample_dir, n)]
    metas = [dict(META, age=30 + 10 * i) for i in range(n)]
    result = triton.infer("lesion", infer_inputs(images, metas))
    probs, labels = result.as_numpy("probabilities"), result.as_numpy("label")
    assert probs.shape == (n, 7) and probs.dtype == np.float32 and labels.shape == (n,)
    classes = httpx.get(server + "/model").json()["classes"]
    for i, (image, meta) in enumerate(zip(images, metas)):
        answer = httpx.post(server + "/predict", files={"image": image}, data={"metadata": json.dumps(meta)}).json()
        assert np.allclose(probs[i], [answer["probabilities"][c] for c in classes], atol=1e-6)
        assert labels[i].decode() == answer["label"]
        assert result.as_numpy("malignant_probability")[i] == pytest.approx(answer["malignant_probability"], abs=1e-6)
        assert result.as_numpy("ood_score")[i] == pytest.approx(answer["ood"]["score"], rel=1e-5)
        assert bool(result.as_numpy("ood_flagged")[i]) == answer["ood"]["flagged"]
        assert json.loads(result.as_numpy("warnings")[i]) == answer["warnings"]


@pytest.mark.scenario
def test_triton_client_gets_the_protocols_errors(triton, sample_dir):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as bad_image:
        triton.infer("lesion", infer_inputs([b"not an image"]))
    assert bad_image.value.status() == "400" and "not a readable image" in bad_image.value.message()
    image = sample_images(sample_dir, 1)[0].read_bytes()
    with pytest.raises(InferenceServerException) as bad_meta:
        triton.infer("lesion", infer_inputs([image], [{"age": "old"}]))
    assert bad_meta.value.status() == "400" and "age" in bad_meta.value.message()


@pytest.fixture(scope="module")
def v2(app_factory, tiny_run):
    return app_factory(tiny_run / "bundle", max_batch=4)


def binary_request(tensors: dict[str, list[bytes]], outputs: list[str] | None = None) -> tuple[bytes, dict]:
    """A request in the binary tensor data extension, built by hand (as the protocol defines it)."""
    chunks, inputs = [], []
    for name, values in tensors.items():
        chunks.append(b"".join(struct.pack("<I", len(v)) + v for v in values))
        inputs.append(
            {
                "name": name,
                "shape": [len(values)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(chunks[-1])},
            }
        )
    head = {"inputs": inputs, **({"outputs": [{"name": o} for o in outputs]} if outputs else {})}
    header = json.dumps(head).encode()
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header))}


def test_a_json_request_with_base64_images_gets_json_outputs(v2, sample_dir):
    image = sample_images(sample_dir, 1)[0].read_bytes()
    body = {
        "id": "r1",
        "parameters": {"prior": "training"},
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]},
            {"name": "metadata", "shape": [1, 1], "datatype": "BYTES", "data": [[json.dumps(META)]]},
        ],
        "outputs": [{"name": "probabilities"}, {"name": "label"}],
    }
    r = v2.post("/v2/models/lesion/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and [o["name"] for o in out["outputs"]] == ["probabilities", "label"]
    answer = v2.post(
        "/predict", files={"image": image}, data={"metadata": json.dumps(META), "prior": "training"}
    ).json()
    classes = v2.get("/model").json()["classes"]
    assert np.allclose(out["outputs"][0]["data"], [answer["probabilities"][c] for c in classes], atol=1e-6)
    assert out["outputs"][0]["shape"] == [1, 7] and out["outputs"][1]["data"] == [answer["label"]]


def test_binary_outputs_follow_the_extension(v2, sample_dir):
    images = [p.read_bytes() for p in sample_images(sample_dir, 2)]
    body, headers = binary_request({"image": images})
    head = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    head["parameters"] = {"binary_data_output": True}
    header = json.dumps(head).encode()
    r = v2.post(
        "/v2/models/lesion/infer",
        content=header + body[int(headers["Inference-Header-Content-Length"]) :],
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta, data = json.loads(r.content[:n]), r.content[n:]
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert sum(sizes) == len(data) and "data" not in meta["outputs"][0]
    probs = np.frombuffer(data[: sizes[0]], np.float32).reshape(2, 7)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize(
    "make,status,words",
    [
        (lambda img: (b"{not json", {}), 400, "not valid JSON"),
        (lambda img: binary_request({"picture": [img]}), 400, "unknown input"),
        (lambda img: binary_request({"metadata": [b"{}"]}), 400, "no 'image' input"),
        (lambda img: binary_request({"image": [img], "metadata": [b"{}", b"{}"]}), 400, "1 images but 2 metadata"),
        (lambda img: binary_request({"image": [img], "metadata": [b'{"site": "moon"}']}), 400, "site"),
        (lambda img: binary_request({"image": [img]}, ["heatmap"]), 400, "unknown outputs"),
        (lambda img: binary_request({"image": [img] * 5}), 413, "at most 4"),
        (lambda img: binary_request({"image": [b"\x89PNG\r\n\x1a\n"]}), 400, "image"),
        (
            lambda img: (binary_request({"image": [img]})[0], {"Inference-Header-Content-Length": "99999999"}),
            400,
            "byte count",
        ),
        (
            lambda img: (binary_request({"image": [img]})[0][:-10], binary_request({"image": [img]})[1]),
            400,
            "does not fit",
        ),
        (  # two byte counts: which one would the tensors follow?
            lambda img: (lambda body, h: (body, [*h.items(), *h.items()]))(*binary_request({"image": [img]})),
            400,
            "not several",
        ),
    ],
)
def test_bad_requests_get_the_protocols_error(v2, sample_dir, make, status, words):
    body, headers = make(sample_images(sample_dir, 1)[0].read_bytes())
    r = v2.post("/v2/models/lesion/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"], r.json()


def test_wrong_datatype_and_shape_are_refused(v2):
    for tensor, words in [
        ({"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}, "must be BYTES"),
        ({"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}, "but 1 elements"),
        ({"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": [["aGk=", "aGk="]]}, "shape [N] or [N, 1]"),
        ({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}, "base64"),
    ]:
        r = v2.post("/v2/models/lesion/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and words in r.json()["error"], (tensor, r.text)
    assert v2.post("/v2/models/other/infer", json={"inputs": []}).status_code == 404


def test_the_api_key_guards_the_model_routes_not_the_health_probes(app_factory, tiny_run):
    client = app_factory(tiny_run / "bundle", api_key="k3y")
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        assert client.get(path).status_code == 200, path
    r = client.get("/v2/models/lesion")
    assert r.status_code == 401 and list(r.json()) == ["error"]
    assert client.get("/v2/models/lesion", headers={"X-API-Key": "k3y"}).status_code == 200


def test_the_bounds_hold_before_any_element_is_read(v2, sample_dir):
    """A shape claiming millions of elements, a binary part holding more than its shape, a huge
    prior, an unknown output: refused before parsing the elements or running the model."""
    huge = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [10_000_000],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 40_000_000},
                }
            ]
        }
    ).encode()
    r = v2.post(
        "/v2/models/lesion/infer",
        content=huge + bytes(4000),
        headers={"Inference-Header-Content-Length": str(len(huge))},
    )
    assert r.status_code == 413 and "at most 4" in r.json()["error"]
    image = sample_images(sample_dir, 1)[0].read_bytes()
    body, headers = binary_request({"image": [image]})
    r = v2.post("/v2/models/lesion/infer", content=body + struct.pack("<I", 0) * 1000, headers=headers)
    assert r.status_code == 400 and "4000 bytes of binary data follow" in r.json()["error"]  # nothing ignored
    head = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    head["inputs"][0]["parameters"]["binary_data_size"] += 4000
    header = json.dumps(head).encode()
    padded = header + body[int(headers["Inference-Header-Content-Length"]) :] + struct.pack("<I", 0) * 1000
    r = v2.post(
        "/v2/models/lesion/infer", content=padded, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert r.status_code == 400 and "holds more than its 1 elements" in r.json()["error"]
    many = {"inputs": [{"name": "image", "shape": [5000], "datatype": "BYTES", "data": [""] * 5000}]}
    assert v2.post("/v2/models/lesion/infer", json=many).status_code == 400  # over the JSON element bound
    before = answers_counted(v2)
    big_prior = {
        "parameters": {"prior": "x" * 20_000},
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}],
    }
    r = v2.post("/v2/models/lesion/infer", json=big_prior)
    assert r.status_code == 413 and "prior parameter is over" in r.json()["error"]
    unknown = dict(big_prior, parameters={}, outputs=[{"name": "heatmap"}])
    assert v2.post("/v2/models/lesion/infer", json=unknown).status_code == 400
    assert answers_counted(v2) == before  # no model work was done: the counter's values, not its lines
    assert v2.post("/v2/models/lesion/infer", json=dict(unknown, outputs=None)).status_code == 200
    assert answers_counted(v2) == before + 1  # the same request, answered, is counted


def test_the_output_list_is_the_metadata_and_the_answer(v2, sample_dir):
    from service.api.tensors import OUTPUTS

    meta = v2.get("/v2/models/lesion").json()
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
    body, headers = binary_request({"image": [sample_images(sample_dir, 1)[0].read_bytes()]})
    names = [o["name"] for o in v2.post("/v2/models/lesion/infer", content=body, headers=headers).json()["outputs"]]
    assert names == list(OUTPUTS)


def image_tensor(image: bytes, n: int = 1) -> dict:
    return {"name": "image", "shape": [n], "datatype": "BYTES", "data": [base64.b64encode(image).decode()] * n}


def answers_counted(client) -> float:
    return metric_total(client.get("/metrics").text, "lesion_answers_total")


@pytest.mark.parametrize(
    "body,status,words",
    [
        # a body of small JSON values: refused by counting them, before any is parsed
        (lambda img: b'{"inputs": [], "id": [' + b"0," * 70_000 + b"0]}", 413, "JSON values"),
        (lambda img: b'{"parameters": {"a": "' + b"," * 70_000 + b'"}}', 413, "JSON values"),
        # nothing nests below what the protocol defines: parameters, outputs' parameters, elements
        (lambda img: {"parameters": {"prior": [[0.1] * 7]}, "inputs": [image_tensor(img)]}, 400, "parameters.prior"),
        (lambda img: {"parameters": {"x": {"y": {"z": 1}}}, "inputs": [image_tensor(img)]}, 400, "parameters.x"),
        (
            lambda img: {"inputs": [image_tensor(img)], "outputs": [{"name": "label", "parameters": {"a": [1, 2]}}]},
            400,
            "outputs.0.parameters",
        ),
        (
            lambda img: {"inputs": [dict(image_tensor(img), data=[[["aGk="]]])]},
            400,
            "inputs.0.data.0",
        ),
        (lambda img: b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "not valid JSON"),
        # a prior that is neither a name nor prevalences is not the default
        (lambda img: {"parameters": {"prior": 0}, "inputs": [image_tensor(img)]}, 400, "prior"),
        (lambda img: {"parameters": {"prior": False}, "inputs": [image_tensor(img)]}, 400, "prior"),
        (lambda img: {"parameters": {"prior": {}}, "inputs": [image_tensor(img)]}, 400, "prior"),
        # an output named twice
        (lambda img: {"inputs": [image_tensor(img)], "outputs": [{"name": "label"}, {"name": "label"}]}, 400, "twice"),
    ],
)
def test_what_a_json_body_can_hold_is_bounded(v2, sample_dir, body, status, words):
    made = body(sample_images(sample_dir, 1)[0].read_bytes())
    before = answers_counted(v2)
    content = made if isinstance(made, bytes) else json.dumps(made).encode()
    r = v2.post("/v2/models/lesion/infer", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status and words in r.json()["error"], r.text
    assert answers_counted(v2) == before  # refused before the model


def test_the_value_count_is_checked_before_parsing():
    """Small values are refused by counting, not by parsing them: the parser never runs past the
    bound (65,536 values), and runs at it."""
    from unittest import mock

    from service.api import tensors
    from service.api.errors import ApiError
    from service.api.settings import Settings

    def values(n: int) -> bytearray:  # a JSON document of exactly n values
        return bytearray(b'{"id": [' + b"0," * (n - 3) + b"0]}")

    settings = Settings()
    with mock.patch.object(tensors.InferRequest, "model_validate_json") as parse:
        with pytest.raises(ApiError) as refused:
            tensors.split_body(values(tensors.MAX_JSON_VALUES + 1), None, settings)
        assert refused.value.status_code == 413 and not parse.called
        tensors.split_body(values(tensors.MAX_JSON_VALUES), None, settings)
        assert parse.called
    small = bytearray(json.dumps({"inputs": [image_tensor(b"x")]}).encode())
    assert tensors.split_body(small, None, settings)[0].inputs[0].name == "image"


def test_the_body_is_released_once_parsed():
    """Nothing keeps a view of a JSON body once it is parsed (so dropping it frees it), nor of a
    binary one once its images are copied out: a bytearray with a live view cannot grow."""
    from service.api import tensors
    from service.api.settings import Settings

    settings = Settings()
    body = bytearray(json.dumps({"inputs": [image_tensor(b"an image")]}).encode())
    request, binary = tensors.split_body(body, None, settings)
    body.extend(b" ")  # BufferError if a view of it were left
    assert tensors.read_request(request, binary, settings)[0] == [b"an image"]
    payload, headers = binary_request({"image": [b"an image"]})
    body = bytearray(payload)
    request, binary = tensors.split_body(body, headers["Inference-Header-Content-Length"], settings)
    images, _ = tensors.read_request(request, binary, settings)
    binary.release()
    body.extend(b" ")
    assert images == [b"an image"]


def test_a_binary_requests_json_header_holds_no_image(v2, sample_dir):
    """With the binary extension the JSON header is bounded as metadata: base64 images in it would
    be charged as binary and cost what JSON costs."""
    image = sample_images(sample_dir, 1)[0].read_bytes() + bytes(300_000)  # 400 kB of base64
    head = json.dumps({"inputs": [image_tensor(image)]}).encode()
    r = v2.post("/v2/models/lesion/infer", content=head, headers={"Inference-Header-Content-Length": str(len(head))})
    assert len(head) > 2 * 4 * 16 * 1024 + 64 * 1024 and r.status_code == 413 and "JSON header" in r.json()["error"]
    assert (
        v2.post("/v2/models/lesion/infer", content=head, headers={"Content-Type": "application/json"}).status_code
        == 200
    )


def test_a_byte_count_of_thousands_of_digits_is_a_400(v2, sample_dir):
    body, _ = binary_request({"image": [sample_images(sample_dir, 1)[0].read_bytes()]})
    for count in ("9" * 5000, "0" * 18 + "1"):  # 19 digits: over the bound, whatever their value
        r = v2.post("/v2/models/lesion/infer", content=body, headers={"Inference-Header-Content-Length": count})
        assert r.status_code == 400 and "byte count" in r.json()["error"]
    from service.api.middleware import byte_count

    assert byte_count("9" * 5000) is None and byte_count("0" * 18 + "1") is None
    assert byte_count("123") == 123 and byte_count("9" * 18) == 10**18 - 1


def test_a_json_prior_object_is_used(v2, sample_dir):
    image = sample_images(sample_dir, 1)[0].read_bytes()
    classes = v2.get("/model").json()["classes"]
    prior = {c: (0.94 if c == "nv" else 0.01) for c in classes}
    r = v2.post("/v2/models/lesion/infer", json={"parameters": {"prior": prior}, "inputs": [image_tensor(image)]})
    answer = v2.post("/predict", files={"image": image}, data={"prior": json.dumps(prior)}).json()
    assert r.status_code == 200, r.text
    got = r.json()["outputs"][0]["data"]
    assert np.allclose(got, [answer["probabilities"][c] for c in classes], atol=1e-6)


@pytest.mark.parametrize("size", [0, 1, 2, 3, PIECE // 4 * 3 - 1, PIECE // 4 * 3, PIECE // 4 * 3 + 1, 3 * PIECE + 5])
def test_base64_decoded_in_pieces_is_the_whole_strings_decoding(size):
    """A JSON image decodes a piece at a time (so health probes are answered meanwhile), to what the
    strict whole-string decoding gives, at and around the piece boundaries; what it refuses, so does this."""
    raw = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    text = base64.b64encode(raw).decode()
    assert b64decode_in_pieces(text) == raw
    cut = len(text) // 2 // 4 * 4
    wrong = [text + "Q", "QQ==" * (PIECE // 4 + 1)]  # a stray character; padding inside
    if text:
        wrong += [text[:cut] + "\n" + text[cut:], "QQ==" + text]  # a line break; padding before the data
    for bad in wrong:
        with pytest.raises(binascii.Error):
            base64.b64decode(bad, validate=True)
        with pytest.raises(binascii.Error):
            b64decode_in_pieces(bad)
