"""The trust boundary, in-process: hostile uploads, metadata, headers and bundles get a clear 4xx or
a refusal, never a 500, and the app keeps answering."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.core.bundle import BundleError, read_manifest
from service.core.predictor import Predictor
from service.core.preprocess import ImageSpec, load_for_model
from tests.conftest import MAX_PIXELS
from tests.helpers import sample_images
from tests.hostile import grey16_png, image_cases, mpo


def test_hostile_corpus_gets_clear_4xx_and_the_app_survives(api, sample_dir):
    jpeg = sample_images(sample_dir)[0].read_bytes()
    for name, files, data, status, words in image_cases(jpeg, MAX_PIXELS):
        r = api.post("/predict", files=files, data=data)
        assert r.status_code == status, (name, r.status_code, r.text)
        if status != 200:
            assert words in r.json()["detail"] and r.json()["request_id"], (name, r.json())
        assert api.get("/health/ready").status_code == 200, name
    assert 'status="500"' not in api.get("/metrics").text


def test_per_request_pixel_budget_is_counted_before_decoding(app_factory, tiny_run, sample_dir):
    big = grey16_png(1000, size=(1000, 1000))  # 1 MP each, under the per-image limit
    client = app_factory(tiny_run / "bundle", max_pixels=1_500_000, max_request_pixels=2_500_000)
    files = [("images", (f"{i}.png", big, "image/png")) for i in range(3)]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 413 and "per-request limit of 2500000" in r.json()["detail"]
    assert client.post("/predict/batch", files=files[:2]).status_code == 200


def test_the_batch_count_is_checked_while_parsing(app_factory, tiny_run, sample_dir):
    client = app_factory(tiny_run / "bundle", max_batch=2)
    jpeg = sample_images(sample_dir)[0].read_bytes()
    r = client.post("/predict/batch", files=[("images", (f"{i}.jpg", jpeg)) for i in range(3)])
    assert r.status_code == 400 and "Too many files" in r.json()["detail"] and r.json()["request_id"]
    assert client.post("/predict/batch", files=[("images", (f"{i}.jpg", jpeg)) for i in range(2)]).status_code == 200


def test_16_bit_png_is_scaled_not_saturated_and_mpo_is_a_jpeg(api):
    spec = ImageSpec(width=64, height=48)
    assert load_for_model(grey16_png(32768), spec).mean() == pytest.approx(127.5, abs=1)
    assert load_for_model(grey16_png(65535), spec).mean() == 255
    r = api.post("/predict", files={"image": ("phone.jpg", mpo(), "image/jpeg")})
    assert r.status_code == 200, r.text


def test_request_ids_are_validated_and_every_error_carries_one(api):
    r = api.get("/health/live", headers={"X-Request-ID": "x" * 5000})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) <= 64 and r.headers["x-request-id"] != "x" * 5000
    r = api.get("/health/live", headers={"X-Request-ID": "abc<script>"})
    assert r.headers["x-request-id"] != "abc<script>"
    assert api.get("/health/live", headers={"X-Request-ID": "trace-42.a"}).headers["x-request-id"] == "trace-42.a"
    for r in (api.get("/nowhere"), api.delete("/predict"), api.get("/predict")):
        assert r.status_code in (404, 405) and r.json()["request_id"] == r.headers["x-request-id"]


def test_security_headers(api):
    for path in ("/", "/docs", "/health/live", "/nowhere"):
        h = api.get(path).headers
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", path
        assert (
            "frame-ancestors 'none'" in h["content-security-policy"]
            and "'unsafe-inline'" not in h["content-security-policy"].split("script-src")[1].split(";")[0]
        ), path


def test_with_a_key_everything_but_health_docs_and_the_page_needs_it(app_factory, tiny_run, sample_dir):
    client = app_factory(tiny_run / "bundle", api_key="s3cret")
    jpeg = sample_images(sample_dir)[0].read_bytes()
    for path in ("/health/live", "/health/ready", "/", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    for path in ("/model", "/metrics"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200, path
    r = client.post("/predict", files={"image": jpeg}, headers={"X-API-Key": "s3cre"})
    assert r.status_code == 401 and r.json()["request_id"]
    assert client.post("/predict", files={"image": jpeg}, headers={"X-API-Key": "s3cret"}).status_code == 200
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s["type"] == "apiKey" and s["name"] == "X-API-Key" for s in schemes.values())
    assert any(s["type"] == "apiKey" and s["name"] == "X-Admin-Key" for s in schemes.values())


def test_uploads_never_roll_over_to_a_temporary_file(app_factory, tiny_run, monkeypatch):
    """Files over Starlette's default 1 MB spool size, under the upload limit, stay in memory."""
    from PIL import Image

    from tests.hostile import encode

    def rollover(*args, **kwargs):
        raise AssertionError("an upload was written to disk")

    monkeypatch.setattr("tempfile.SpooledTemporaryFile.rollover", rollover)
    client = app_factory(tiny_run / "bundle", max_upload_bytes=2_000_000, max_batch=2)
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), np.uint8)), "PNG")
    assert 1_100_000 < len(png) < 2_000_000
    r = client.post("/predict/batch", files=[("images", (f"{i}.png", png, "image/png")) for i in range(2)])
    assert r.status_code == 200, r.text


def test_a_500_says_its_request_id_and_logs_it(tiny_run, sample_dir, caplog):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.settings import Settings

    jpeg = sample_images(sample_dir)[0].read_bytes()
    with TestClient(create_app(Settings(bundle=tiny_run / "bundle")), raise_server_exceptions=False) as client:
        client.app.state.model.predictor.predict = lambda *a, **k: 1 / 0  # a bug, not the user's fault
        with caplog.at_level(logging.ERROR, logger="service"):
            r = client.post("/predict", files={"image": jpeg})
    assert r.status_code == 500 and r.json()["request_id"]
    assert any(r.json()["request_id"] in rec.getMessage() for rec in caplog.records)


# ---- bundles: nothing unverified is unpickled --------------------------------------------------


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


class Payload:
    """Unpickling this runs open(marker, "w"): proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_a_matching_hash_still_cannot_run_code(tiny_run, tmp_path):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    marker = tmp_path / "marker"
    evil = pickle.dumps(Payload(marker))
    stack = read_manifest(bundle).stack.file
    (bundle / stack).write_bytes(evil)
    rewrite_manifest(bundle, lambda m: m["files"].update({stack: hashlib.sha256(evil).hexdigest()}))
    with pytest.raises(BundleError, match=r"asks to load (builtins|io)\.open.*refusing"):
        Predictor.load(bundle)
    assert not marker.exists()


def function_transformer_pipeline() -> bytes:
    """An allowed Pipeline wrapping FunctionTransformer(func=...): harmless to load, runs code at predict."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    return pickle.dumps(make_pipeline(FunctionTransformer(func=print)))


@pytest.mark.parametrize(
    "pickled, words",
    [  # xgboost.core.Booster is an allowed class, but Booster(model_file=PATH) would open any file
        (b"cxgboost.core\nBooster\n(NNV/etc/hostname\ntR.", r"call xgboost\.core\.Booster"),  # REDUCE
        (b"(NNV/etc/hostname\nixgboost.core\nBooster\n.", "INST/OBJ"),  # protocol 0 INST
        (b"(cxgboost.core\nBooster\nNNV/etc/hostname\no.", "INST/OBJ"),  # protocol 1 OBJ
        (b"\x80\x02cxgboost.core\nBooster\nNNV/etc/hostname\n\x87\x81.", "create"),  # NEWOBJ with arguments
        (function_transformer_pipeline(), "FunctionTransformer"),
    ],
)
def test_model_classes_are_rebuilt_never_called_with_pickle_chosen_arguments(tiny_run, tmp_path, pickled, words):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    booster = read_manifest(bundle).boosters[0]
    (bundle / booster.file).write_bytes(pickled)
    rewrite_manifest(bundle, lambda m: m["files"].update({booster.file: hashlib.sha256(pickled).hexdigest()}))
    with pytest.raises(BundleError, match=rf"{words}.*refusing"):
        Predictor.load(bundle)


def test_a_corrupt_pickle_is_a_bundle_error_not_a_traceback(tiny_run, tmp_path):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    stack = read_manifest(bundle).stack.file
    junk = b"\x80\x04garbage"
    (bundle / stack).write_bytes(junk)
    rewrite_manifest(bundle, lambda m: m["files"].update({stack: hashlib.sha256(junk).hexdigest()}))
    with pytest.raises(BundleError, match="cannot be loaded"):
        Predictor.load(bundle)


def test_unlisted_or_escaping_files_are_never_opened(tiny_run, tmp_path):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    booster = read_manifest(bundle).boosters[0].file
    outside = tmp_path / "outside.pkl"
    shutil.move(bundle / booster, outside)
    (bundle / booster).symlink_to(outside)  # same bytes, same hash, but outside the folder
    with pytest.raises(BundleError, match="resolves outside"):
        Predictor.load(bundle)
    rewrite_manifest(bundle, lambda m: m["boosters"][0].update(file="/etc/passwd"))
    with pytest.raises(BundleError, match="is not among the hashed files"):
        read_manifest(bundle)


def test_signed_bundles(tiny_run, tmp_path):
    from service.core.signing import generate_keypair, sign_bundle

    private, public = generate_keypair(tmp_path / "keys")
    other_private, other_public = generate_keypair(tmp_path / "other")
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    with pytest.raises(BundleError, match="is not signed"):
        Predictor.load(bundle, public_key_pem=public.read_bytes())
    sign_bundle(bundle, private.read_bytes())
    assert Predictor.load(bundle, public_key_pem=public.read_bytes()).manifest.bundle_id
    with pytest.raises(BundleError, match="signature does not match"):
        Predictor.load(bundle, public_key_pem=other_public.read_bytes())
    rewrite_manifest(bundle, lambda m: m["features"].update(age_max=920))  # the manifest itself is covered
    with pytest.raises(BundleError, match="signature does not match"):
        Predictor.load(bundle, public_key_pem=public.read_bytes())


def test_keygen_and_sign_commands(tiny_run, tmp_path, capsys):
    from training.__main__ import main

    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "bundle-signing.key").stat().st_mode & 0o077 == 0  # private key not readable by others
    assert main(["sign", "--bundle", str(bundle), "--key", str(tmp_path / "k" / "bundle-signing.key")]) == 0
    assert (bundle / "manifest.sig").exists()
    assert main(["sign", "--bundle", str(tmp_path / "nope"), "--key", str(tmp_path / "k" / "bundle-signing.key")]) == 2
    assert "error: cannot sign" in capsys.readouterr().err


def test_admin_routes_are_off_without_an_admin_key_and_need_it(app_factory, tiny_run):
    bundle = tiny_run / "bundle"
    r = app_factory(bundle).post("/admin/bundle", json={})
    assert r.status_code == 403 and "LESION_ADMIN_KEY" in r.json()["detail"]
    client = app_factory(bundle, admin_key="a" * 20)
    assert client.post("/admin/bundle", json={}, headers={"X-Admin-Key": "b" * 20}).status_code == 401
    outside = client.post("/admin/bundle", json={"bundle": "/tmp"}, headers={"X-Admin-Key": "a" * 20})
    assert outside.status_code == 403
    same = client.post("/admin/bundle", json={}, headers={"X-Admin-Key": "a" * 20})  # reload the configured one
    assert same.status_code == 200 and same.json()["previous"] == same.json()["serving"]
