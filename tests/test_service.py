"""The real server (uvicorn on a loopback port) with a bundle trained on the real sample."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.features import ClinicalMetadata
from service.predictor import COMPONENTS, Predictor
from service.preprocess import load_for_model
from service.settings import Settings
from tests.conftest import REPO

MAX_UPLOAD = 3_000_000
MAX_PIXELS = 2_000_000


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(bundle, python=sys.executable, cwd=REPO) -> tuple[subprocess.Popen, str]:
    """`python -m service` on a free loopback port; returns once /health/ready answers 200."""
    port = free_port()
    env = dict(os.environ, LESION_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), LESION_MAX_PIXELS=str(MAX_PIXELS))
    proc = subprocess.Popen(
        [str(python), "-m", "service", "--bundle", str(bundle), "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


@pytest.fixture(scope="module")
def server(smoke_run):
    proc, url = start_server(smoke_run / "bundle")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def predictor(smoke_run):
    return Predictor.load(smoke_run / "bundle")


def sample_images(sample_dir, n=4):
    return sorted((sample_dir / "images").iterdir())[::500][:n]


def offline(predictor, data: bytes, meta: ClinicalMetadata) -> dict:
    img = load_for_model(data, predictor.manifest.preprocessing)
    comps = predictor.predict_components(img[None], [meta])
    return {k: v[0] for k, v in comps.items()}


def assert_same(response_json, expected, classes):
    for name in COMPONENTS:
        got = np.array([response_json["components"][name][c] for c in classes])
        assert np.abs(got - expected[name]).max() <= 1e-5, name
    assert np.abs(np.array([response_json["probabilities"][c] for c in classes]) - expected["stack"]).max() <= 1e-5


def test_predict_matches_offline_inference(server, predictor, sample_dir):
    classes = predictor.manifest.classes
    metas = [
        dict(age=45, sex="male", site="back"),
        dict(age=0, sex="female", site="lower extremity"),
        {},
        dict(site="face"),
    ]
    for path, meta in zip(sample_images(sample_dir), metas):
        r = httpx.post(
            server + "/predict",
            files={"image": (path.name, path.read_bytes(), "image/jpeg")},
            data={"metadata": json.dumps(meta)},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert_same(body, offline(predictor, path.read_bytes(), ClinicalMetadata(**meta)), classes)
        assert (
            body["label"]
            == classes[int(np.argmax(offline(predictor, path.read_bytes(), ClinicalMetadata(**meta))["stack"]))]
        )
        assert body["malignant_probability"] == pytest.approx(
            sum(body["probabilities"][c] for c in ("mel", "bcc", "akiec"))
        )
        assert (
            body["model"]["bundle_id"] == predictor.manifest.bundle_id
            and body["request_id"]
            and "Research use" in body["notice"]
        )
        assert r.headers["x-request-id"] == body["request_id"]


def test_metadata_changes_the_answer(server, sample_dir):
    path = sample_images(sample_dir)[0]
    a = httpx.post(
        server + "/predict", files={"image": path.read_bytes()}, data={"metadata": '{"age": 20, "site": "back"}'}
    ).json()
    b = httpx.post(
        server + "/predict", files={"image": path.read_bytes()}, data={"metadata": '{"age": 85, "site": "face"}'}
    ).json()
    assert a["components"]["cnn"] == b["components"]["cnn"]  # the image alone is the same
    assert a["components"]["xgboost"] != b["components"]["xgboost"]  # the boosters read the metadata


def test_large_jpeg_and_exif_orientation(server, predictor, sample_dir):
    path = sample_images(sample_dir)[1]
    big = Image.open(path).resize((600, 450), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    r = httpx.post(
        server + "/predict", files={"image": ("big.jpg", data, "image/jpeg")}, data={"metadata": '{"age": 60}'}
    )
    assert r.status_code == 200, r.text
    assert_same(r.json(), offline(predictor, data, ClinicalMetadata(age=60)), predictor.manifest.classes)
    # a portrait-stored image with EXIF orientation 6 (rotate 90°) is turned upright before anything else
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    big.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif)
    upright = load_for_model(buf.getvalue(), predictor.manifest.preprocessing)
    plain = load_for_model(data, predictor.manifest.preprocessing)
    assert upright.shape == plain.shape and np.abs(upright.astype(int) - plain.astype(int)).mean() < 12


def test_batch_matches_single_requests(server, predictor, sample_dir):
    paths = sample_images(sample_dir, 3)
    metas = [{"age": 30}, {"sex": "female"}, {"site": "trunk", "age": 70}]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = httpx.post(server + "/predict/batch", files=files, data={"metadata": json.dumps(metas)}, timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in paths]
    for p, path, meta in zip(preds, paths, metas):
        assert_same(p, offline(predictor, path.read_bytes(), ClinicalMetadata(**meta)), predictor.manifest.classes)


def test_concurrent_requests_are_correct(server, sample_dir):
    paths = sample_images(sample_dir, 4)

    def call(i):
        p = paths[i % len(paths)]
        return i % len(paths), httpx.post(server + "/predict", files={"image": p.read_bytes()}, timeout=60).json()[
            "probabilities"
        ]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    by_image = {}
    for i, probs in results:
        by_image.setdefault(i, []).append(probs)
    for probs in by_image.values():
        assert all(p == probs[0] for p in probs)


def test_health_model_metrics_docs(server, predictor):
    assert httpx.get(server + "/health/live").json() == {"status": "alive"}
    assert httpx.get(server + "/health/ready").json()["bundle_id"] == predictor.manifest.bundle_id
    info = httpx.get(server + "/model").json()
    assert info["classes"] == predictor.manifest.classes and "unknown" in info["metadata_schema"]["sites"]
    assert set(info["metrics"]) == set(COMPONENTS) and "malignant_pauc" in info["metrics"]["stack"]
    metrics = httpx.get(server + "/metrics").text
    assert 'lesion_http_requests_total{route="/predict",status="200"}' in metrics
    assert "lesion_model_inference_seconds_bucket" in metrics and "lesion_http_request_seconds_bucket" in metrics
    docs = httpx.get(server + "/docs").text
    assert "swagger-ui" in docs and "cdn" not in docs.lower()  # the docs page works offline
    assert httpx.get(server + "/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/model", "/health/ready"} <= set(spec["paths"])
    assert "example" in spec["components"]["schemas"]["PredictResponse"]
    assert "<form" in httpx.get(server + "/").text


def png(width, height, noise=False) -> bytes:
    arr = (
        np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        if noise
        else np.zeros((height, width, 3), np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def bad_inputs(sample_dir):
    jpeg = sample_images(sample_dir)[0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (20, 20)).save(gif, "GIF")
    return [
        ({"image": ("a.txt", b"hello, not an image", "text/plain")}, {}, 400, "not a readable image"),
        ({"image": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}, {}, 400, "truncated or corrupt"),
        ({"image": ("a.gif", gif.getvalue(), "image/gif")}, {}, 415, "unsupported image format GIF"),
        ({"image": ("big.png", png(1100, 1000, noise=True), "image/png")}, {}, 413, "byte limit"),
        ({"image": ("bomb.png", png(2000, 1500), "image/png")}, {}, 413, "over the limit of 2000000 pixels"),
        ({"image": ("empty.jpg", b"", "image/jpeg")}, {}, 400, "empty"),
        ({"image": ("a.jpg", jpeg, "image/jpeg")}, {"metadata": "{age: 5"}, 400, "not valid JSON"),
        ({"image": ("a.jpg", jpeg, "image/jpeg")}, {"metadata": "[1, 2]"}, 400, "must be a JSON object"),
        ({"image": ("a.jpg", jpeg, "image/jpeg")}, {"metadata": '{"age": 121}'}, 422, "age 121 is outside 0-120"),
        ({"image": ("a.jpg", jpeg, "image/jpeg")}, {"metadata": '{"age": -1}'}, 422, "outside 0-120"),
        ({"image": ("a.jpg", jpeg, "image/jpeg")}, {"metadata": '{"age": "old"}'}, 422, "age"),
        (
            {"image": ("a.jpg", jpeg, "image/jpeg")},
            {"metadata": '{"sex": "other"}'},
            422,
            "use one of: male, female, unknown",
        ),
        ({"image": ("a.jpg", jpeg, "image/jpeg")}, {"metadata": '{"site": "elbow"}'}, 422, "lower extremity"),
        (
            {"image": ("a.jpg", jpeg, "image/jpeg")},
            {"metadata": '{"height": 180}'},
            422,
            "unknown metadata field 'height'",
        ),
        ({"photo": ("a.jpg", jpeg, "image/jpeg")}, {}, 422, "missing form field 'image'"),
    ]


def test_bad_input_gets_a_clear_4xx(server, sample_dir):
    for files, data, status, message in bad_inputs(sample_dir):
        r = httpx.post(server + "/predict", files=files, data=data, timeout=30)
        assert r.status_code == status, (message, r.status_code, r.text)
        assert message in r.json()["detail"], (message, r.json())
    r = httpx.post(server + "/predict", files={"image": b"x" * (MAX_UPLOAD + 2 * 1024 * 1024)})
    assert r.status_code == 413 and "byte limit" in r.json()["detail"]
    r = httpx.post(
        server + "/predict/batch",
        files=[("images", sample_images(sample_dir)[0].read_bytes())] * 2,
        data={"metadata": "[{}]"},
    )
    assert r.status_code == 422 and "one object per image" in r.json()["detail"]
    # after all that, the server still answers correctly
    assert httpx.get(server + "/health/ready").status_code == 200
    assert 'status="500"' not in httpx.get(server + "/metrics").text


def run_service(bundle) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "--bundle", str(bundle), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_bundles_stop_startup_with_one_line(smoke_run, tmp_path):
    out = run_service(tmp_path / "nope")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "does not exist" in out.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(smoke_run / "bundle", tampered)
    with open(tampered / "xgboost.pkl", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    out = run_service(tampered)
    assert out.returncode == 2 and "xgboost.pkl does not match its sha256" in out.stderr
    old = tmp_path / "old"
    shutil.copytree(smoke_run / "bundle", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["library_versions"]["xgboost"] = "1.7.6"
    (old / "manifest.json").write_text(json.dumps(manifest))
    out = run_service(old)
    assert out.returncode == 2 and "written with xgboost 1.7.6" in out.stderr
    manifest["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert "format_version 99" in run_service(old).stderr
    (old / "cnn.onnx").unlink()
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert "cnn.onnx is missing" in run_service(old).stderr


def test_not_ready_until_loaded_and_api_key(smoke_run, sample_dir):
    app = create_app(Settings(bundle=smoke_run / "bundle", api_key="s3cret"))
    client = TestClient(app)  # lifespan not started: nothing loaded
    r = client.get("/health/ready")
    assert r.status_code == 503 and "loading" in r.json()["detail"]
    with TestClient(app) as client:
        deadline = time.time() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        jpeg = sample_images(sample_dir)[0].read_bytes()
        assert client.post("/predict", files={"image": jpeg}).status_code == 401
        assert client.post("/predict", files={"image": jpeg}, headers={"X-API-Key": "s3cret"}).status_code == 200


# ---- the Python client, against the same real server ----------------------------------------


def test_client_script_table_json_and_csv(server, sample_dir, tmp_path, capsys):
    from clients.predict import main as client_main
    from tests.conftest import make_subset

    img = str(sample_images(sample_dir)[0])
    assert client_main([img, "--age", "50", "--sex", "male", "--site", "back", "--url", server]) == 0
    out = capsys.readouterr().out
    assert "malignant probability" in out and "stack" in out and "Research use only" in out
    assert client_main([img, "--url", server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"]
    d = make_subset(sample_dir, tmp_path / "d", per_class=1)
    for source in (d / "images", d / "HAM10000_metadata.csv"):
        out_csv = tmp_path / f"{source.name}.csv"
        assert client_main([str(source), "--csv", str(out_csv), "--url", server]) == 0
        rows = list(__import__("csv").DictReader(open(out_csv)))
        assert len(rows) == len(list((d / "images").iterdir())) and {"label", "malignant_probability", "p_mel"} <= set(
            rows[0]
        )


def test_client_errors_carry_the_server_message(server, sample_dir, capsys):
    from clients.client import LesionAPIError, LesionClient
    from clients.predict import main as client_main

    with LesionClient(server) as c:
        with pytest.raises(LesionAPIError) as err:
            c.predict(sample_images(sample_dir)[0], sex="robot")
        assert err.value.status == 422 and "use one of: male, female, unknown" in err.value.detail
        assert c.model()["classes"][0] == "akiec"
        batch = c.predict_batch(sample_images(sample_dir, 2), [{"age": 40}, {}])
        assert len(batch["predictions"]) == 2
    assert client_main([str(sample_images(sample_dir)[0]), "--url", server, "--sex", "robot"]) == 1
    assert "use one of" in capsys.readouterr().err
    with LesionClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as c:
        with pytest.raises(ConnectionError, match="cannot reach"):
            c.model()


def test_client_retries_while_the_model_loads(smoke_run, sample_dir):
    from clients.client import LesionClient

    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, json={"detail": "model is still loading"})
        return httpx.Response(200, json={"classes": ["akiec"]})

    c = LesionClient("http://test", retries=3, backoff=0.01)
    c._http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    assert c.model() == {"classes": ["akiec"]} and len(calls) == 3
