"""Property-based fuzzing of every client input, in-process: whatever a client sends, the answer is
a 2xx or a 4xx with a JSON {detail, request_id} body, never a 5xx.

Multipart bodies are built byte by byte here (not by an HTTP client, which would refuse to encode a
lone surrogate or a quote in a file name), so field values, file names and image bytes can be
anything: invalid UTF-8, control characters, JSON of any shape, corrupt or hostile images. The
examples are derandomised: CI runs the same ones every time, in about a minute.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import CLASSES, png, sample_images
from tests.hostile import progressive_jpeg, scan_bomb

BOUNDARY = b"fuzz7MA4YWxkTrZu0gW"
FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# JSON text as a client might write it: json.dumps escapes lone surrogates and control characters
json_text = json_values.map(json.dumps)
hostile_text = st.sampled_from(
    [
        "[" * 5000,
        '{"a":' + "[" * 10_000,
        '{"age": ' + "9" * 4301 + "}",
        '{"age": 1' + "0" * 400 + "}",
        '{"sex": "\\ud800"}',
        '{"site": "x\\nINFO service.requests: FORGED"}',
        '{"age": NaN}',
        '{"age": -Infinity}',
        "null",
        "",
        "   ",
    ]
)
metadata_objects = st.fixed_dictionaries(
    {},
    optional={
        "age": st.one_of(st.integers(-10, 200), st.floats(), st.text(max_size=5), json_values),
        "sex": st.one_of(st.sampled_from(["male", "female", "unknown", " Male ", "x"]), json_values),
        "site": st.one_of(st.sampled_from(["back", "face", "lower_extremity", "nowhere"]), json_values),
        "localization": st.sampled_from(["back", "trunk", "?"]),
        "extra": json_values,
    },
).map(json.dumps)
metadata = st.one_of(metadata_objects, json_text, hostile_text, st.text(max_size=50))
priors = st.one_of(
    st.sampled_from(["balanced", "training", "", "BALANCED", "uniform"]),
    st.dictionaries(st.sampled_from(CLASSES + ["x"]), json_values, max_size=8).map(json.dumps),
    st.fixed_dictionaries({c: st.floats(min_value=0, max_value=1e308) for c in CLASSES}).map(json.dumps),
    hostile_text,
    st.text(max_size=30),
)
raw_bytes = st.binary(max_size=64)  # for file names and field values: invalid UTF-8 included


@pytest.fixture(scope="module")
def images(sample_dir) -> list[bytes]:
    jpeg = sample_images(sample_dir)[0].read_bytes()
    return [jpeg, png(64, 48), progressive_jpeg(), scan_bomb(extra_scans=200), jpeg[: len(jpeg) // 2], b""]


def image_bytes(images: list[bytes]) -> st.SearchStrategy[bytes]:
    def mutate(data: bytes, at: int, value: int) -> bytes:
        at = at % max(len(data), 1)
        return data[:at] + bytes([value]) + data[at + 1 :]

    originals = st.sampled_from(images)
    mutated = st.builds(mutate, originals, st.integers(0, 10**6), st.integers(0, 255))
    return st.one_of(originals, mutated, st.binary(max_size=512))


def multipart(parts: list[tuple[bytes, bytes | None, bytes]]) -> bytes:
    """(field name, file name or None, value) -> a multipart/form-data body."""
    out = b""
    for name, filename, value in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def text_field(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")  # a lone surrogate as the bytes a broken client sends


def check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert body["detail"] and body["request_id"] == r.headers["x-request-id"], body


CHARSETS = st.sampled_from(
    ["", "; charset=utf-8", "; charset=utf-7", "; charset=latin-1", "; charset=nope", '; charset="']
)


def post_form(api, path: str, parts, query: str = "", charset: str = ""):
    headers = {"Content-Type": "multipart/form-data; boundary=" + BOUNDARY.decode() + charset}
    return api.post(path + query, content=multipart(parts), headers=headers)


def test_predict_never_answers_5xx(api, images):
    @FUZZ
    @given(
        image=image_bytes(images),
        filename=st.one_of(st.just(b"a.jpg"), raw_bytes),
        meta=st.one_of(st.none(), metadata),
        prior=st.one_of(st.none(), priors),
        explain=st.one_of(st.none(), st.sampled_from(["true", "false", "1", "on", "maybe", ""]), st.text(max_size=8)),
        query=st.one_of(st.just(""), st.sampled_from(["?explain=true", "?explain=2", "?explain=%ff", "?x=1&x=2"])),
        junk=st.one_of(st.none(), st.tuples(raw_bytes, raw_bytes)),
    )
    @example(0, b"a.jpg", '{"sex": "\\ud800"}', None, None, "", None)  # 500s before this round's fixes
    @example(0, b"a.jpg", None, '{"akiec": ' + "9" * 4301 + "}", None, "", None)
    @example(0, b"a.jpg", None, "{" + ", ".join(f'"{c}": 1{"0" * 400}' for c in CLASSES) + "}", None, "", None)
    @example(0, b"a.jpg", None, '{"a":' + "[" * 10_000, None, "", None)
    @example(0, b'\xed\xa0\x80"\r\n', "\ud800", "\ud800", "\ud800", "?explain=%ff", (b"\x00", b"\xff"))
    def run(image, filename, meta, prior, explain, query, junk):
        if isinstance(image, int):  # an @example: the first image (the sample JPEG)
            image = images[image]
        parts = [(b"image", filename, image)]
        for name, value in (("metadata", meta), ("prior", prior), ("explain", explain)):
            if value is not None:
                parts.append((name.encode(), None, text_field(value)))
        if junk is not None:
            parts.append(junk + (b"x",))  # an unexpected field (name, file name, value)
        check(post_form(api, "/predict", parts, query))

    run()
    assert api.get("/health/ready").status_code == 200


def test_predict_batch_never_answers_5xx(api, images):
    @FUZZ
    @given(
        files=st.lists(st.tuples(image_bytes(images), st.one_of(st.just(b"b.png"), raw_bytes)), max_size=4),
        meta=st.one_of(st.none(), st.lists(metadata_objects, max_size=5).map(json.dumps), metadata),
        prior=st.one_of(st.none(), priors),
        charset=CHARSETS,
        lesion_ids=st.one_of(
            st.none(),
            st.lists(st.one_of(st.none(), st.text(max_size=6), json_values), max_size=5).map(json.dumps),
            hostile_text,
            st.sampled_from(['["\\ud800"]', '["a", "A"]', '["e\\u0301"]', "[" * 5000, '["a", 1' + "0" * 5000 + "]"]),
        ),
    )
    @example([(0, b"a.jpg")], '[{"sex": "\\ud800"}]', None, "", None)  # 500s before earlier fixes
    @example([(0, b"+2AA-.jpg")], None, None, "; charset=utf-7", None)  # a file name decoded to a lone surrogate
    @example([(0, b"a.jpg")], None, None, "", '["\\ud800"]')  # 500s before this round's fixes
    @example([(0, b"a.jpg")], None, None, "", "[" * 5000)
    def run(files, meta, prior, charset, lesion_ids):
        parts = [(b"images", name, images[data] if isinstance(data, int) else data) for data, name in files]
        for name, value in (("metadata", meta), ("prior", prior), ("lesion_ids", lesion_ids)):
            if value is not None:
                parts.append((name.encode(), None, text_field(value)))
        check(post_form(api, "/predict/batch", parts, charset=charset))

    run()


def test_admin_swap_never_answers_5xx(app_factory, tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    client = app_factory(tiny_run / "bundle", admin_key="k" * 20, bundles_root=root)
    headers = {"X-Admin-Key": "k" * 20, "Content-Type": "application/json"}
    paths = st.one_of(
        st.text(max_size=40),
        st.sampled_from(["/tmp/a\x00b", "\ud800", "x" * 5000, "../../etc", str(root), str(root / "nope")]),
        st.text(max_size=10).map(lambda t: str(root / t)),
    )

    @FUZZ
    @example(b'{"bundle": "/tmp/a\\u0000b"}')  # 500s before this round's fixes
    @example(b'{"bundle": "\\ud800"}')
    @example(b'{"bundle": ' + b"[" * 10_000)
    @given(
        body=st.one_of(
            st.fixed_dictionaries({"bundle": st.one_of(paths, json_values)}).map(json.dumps),
            json_text,
            hostile_text,
        ).map(lambda t: t.encode("ascii", "backslashreplace"))
        | st.binary(max_size=64)
    )
    def run(body):
        check(client.post("/admin/bundle", content=body, headers=headers))

    run()
    assert client.get("/health/ready").status_code == 200


def v2_tensor(name: str, values: list) -> dict:
    return {"name": name, "shape": [len(values)], "datatype": "BYTES", "data": values}


def test_inference_json_never_answers_5xx(api, images):
    """The Open Inference Protocol's JSON body: any shape of JSON anywhere (parameters, outputs,
    elements, the prior), images and metadata as strings; a 2xx or the protocol's 4xx {"error"}."""
    b64 = [base64.b64encode(data).decode() for data in images]
    element = st.one_of(st.sampled_from(range(len(b64))), st.text(max_size=20), json_values)
    request = st.fixed_dictionaries(
        {
            "inputs": st.lists(
                st.one_of(st.builds(v2_tensor, st.just("image"), st.lists(element, max_size=3)), json_values),
                max_size=3,
            )
        },
        optional={
            "id": json_values,
            "parameters": st.one_of(st.fixed_dictionaries({"prior": st.one_of(json_values, priors)}), json_values),
            "outputs": st.lists(
                st.fixed_dictionaries({"name": st.text(max_size=25)}, optional={"parameters": json_values}), max_size=3
            ),
        },
    )

    def resolve(value):  # an integer element of an image tensor: one of the images, base64
        if isinstance(value, dict) and value.get("name") == "image" and isinstance(value.get("data"), list):
            return dict(value, data=[b64[v] if isinstance(v, int) and 0 <= v < len(b64) else v for v in value["data"]])
        return value

    @FUZZ
    @given(body=request, metas=st.one_of(st.none(), st.lists(metadata, min_size=1, max_size=3)))
    @example({"inputs": [v2_tensor("image", [0])], "parameters": {"prior": 0}}, None)  # the default, once
    @example({"inputs": [v2_tensor("image", [0])], "id": [[[[0]]]]}, ['{"sex": "\\ud800"}'])
    def run(body, metas):
        body = dict(body, inputs=[resolve(t) for t in body["inputs"]])
        if metas is not None:
            body["inputs"].append(v2_tensor("metadata", metas))
        content = json.dumps(body).encode("ascii", "backslashreplace")
        r = api.post("/v2/models/lesion/infer", content=content, headers={"Content-Type": "application/json"})
        check_v2(r)

    run()
    for hostile in (b"[" * 100_000, b'{"inputs": ' + b"0," * 100_000, b'{"id": 1' + b"0" * 5000 + b"}", b"\xff\xfe"):
        check_v2(api.post("/v2/models/lesion/infer", content=hostile, headers={"Content-Type": "application/json"}))
    assert api.get("/health/ready").status_code == 200


def test_inference_binary_never_answers_5xx(api, images):
    """The binary tensor data extension: any header value, any binary_data_size, any bytes after."""

    @FUZZ
    @given(
        values=st.lists(image_bytes(images), min_size=1, max_size=3),
        size_delta=st.integers(-8, 8),
        tail=st.binary(max_size=16),
        header=st.one_of(st.none(), st.sampled_from(["", "-1", "9" * 5000, "1e3", " 12", "0x10", "+5"])),
        shape=st.one_of(st.none(), st.lists(st.integers(-2, 2**40), min_size=1, max_size=3)),
    )
    @example([0], 0, b"", None, None)
    def run(values, size_delta, tail, header, shape):
        values = [images[v] if isinstance(v, int) else v for v in values]
        data = b"".join(struct.pack("<I", len(v)) + v for v in values)
        tensor = {
            "name": "image",
            "shape": shape if shape is not None else [len(values)],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(data) + size_delta},
        }
        head = json.dumps({"inputs": [tensor]}).encode()
        count = str(len(head)) if header is None else header
        r = api.post(
            "/v2/models/lesion/infer",
            content=head + data + tail,
            headers={"Inference-Header-Content-Length": count},
        )
        check_v2(r)
        if header is None and shape is None and size_delta == 0 and not tail and all(v in images[:3] for v in values):
            assert r.status_code == 200, r.text  # a well-formed request of readable images is answered

    run()


def check_v2(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert list(r.json()) == ["error"] and r.json()["error"], r.text
