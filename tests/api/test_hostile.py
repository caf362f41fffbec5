"""The trust boundary, in-process: hostile uploads, metadata, headers and bundles get a clear 4xx or
a refusal, never a 500, and the app keeps answering."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.core.bundle import BundleError, read_manifest
from service.core.predictor import Predictor
from service.core.preprocess import ImageSpec, load_for_model
from tests.conftest import MAX_PIXELS
from tests.helpers import CLASSES, REPO, sample_images
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
    with pytest.raises(BundleError, match="xgboost.pkl is a symbolic link"):
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


# ---- decoding with a budget ----------------------------------------------------------------------


def test_jpeg_scans_are_counted_from_the_markers_and_a_scan_bomb_is_refused_before_decoding():
    from PIL import Image

    from service.core.preprocess import (
        MAX_JPEG_SCANS,
        MAX_SEGMENTS,
        ImageError,
        ImageTooLargeError,
        file_structure,
        open_image,
    )

    def jpeg_scans(data: bytes, limit: int) -> int:
        return file_structure(data, MAX_SEGMENTS, limit)[1]

    from tests.hostile import encode, progressive_jpeg, scan_bomb

    assert jpeg_scans(encode(Image.new("RGB", (64, 48)), "JPEG"), MAX_JPEG_SCANS) == 1
    assert jpeg_scans(progressive_jpeg(), MAX_JPEG_SCANS) == 10  # libjpeg's progressive script
    assert jpeg_scans(encode(Image.new("L", (64, 48)), "JPEG", progressive=True), MAX_JPEG_SCANS) == 6
    assert jpeg_scans(mpo(), MAX_JPEG_SCANS) == 1  # the first picture only: the only one decoded
    bomb = scan_bomb(extra_scans=100_000)
    assert jpeg_scans(bomb, MAX_JPEG_SCANS) == MAX_JPEG_SCANS + 1  # stops counting past the limit
    first_scan = bomb.index(b"\xff\xda")
    for junk in (b"\x00", b"\xff\x00\xff\xff", b"junk"):  # skipped by libjpeg: must not stop the count
        assert jpeg_scans(bomb[:first_scan] + junk + bomb[first_scan:], MAX_JPEG_SCANS) == MAX_JPEG_SCANS + 1
    plain = progressive_jpeg()
    assert jpeg_scans(plain[:-2] + b"\xff" * 1_000_000 + plain[-2:], MAX_JPEG_SCANS) == 10  # fill bytes
    comments = plain[:20] + b"\xff\xfe\x00\x02" * 100_000 + plain[20:]  # more segments than any JPEG has
    with pytest.raises(ImageError, match="segments or chunks"):  # before Pillow walks them one by one
        open_image(comments)
    with pytest.raises(ImageError, match=f"over {MAX_JPEG_SCANS} scans"):
        open_image(scan_bomb(extra_scans=1000), ImageSpec(width=64, height=48))
    assert open_image(progressive_jpeg(), ImageSpec(width=64, height=48)).size == (300, 225)  # still drafted
    # a progressive JPEG holds its coefficients at full size: counted at full size, not at the draft's
    with pytest.raises(ImageTooLargeError, match="progressive JPEG decodes at full size"):
        open_image(progressive_jpeg((5000, 4000)), ImageSpec(width=64, height=48))


@pytest.mark.timeout(120)  # a walk that rescans the run from each of its bytes would take days here
def test_a_run_of_ff_bytes_with_no_marker_after_it_is_walked_once():
    """A run of FF bytes that ends the file, or a stuffed 00, or a restart marker inside a scan, is
    no marker: the walk steps past it (a 40 KB run froze a worker for 15 s when each byte of the run
    was rescanned) and still finds the markers after it."""
    from service.core.preprocess import MAX_JPEG_SCANS, MAX_SEGMENTS, file_structure, jpeg_markers

    run = b"\xff" * 2_000_000
    assert list(jpeg_markers(b"\xff\xd8" + run)) == []
    # the markers, each with the fill and junk bytes skipped before it
    assert list(jpeg_markers(b"\xff\xd8" + run + b"\x00" + run + b"\x00\xff\xd9")) == [(0xD9, 4_000_002)]
    scan = b"\xff\xda\x00\x02" + b"\x12" + run + b"\x00" + run + b"\xd3" + run  # entropy data, never ended
    assert list(jpeg_markers(b"\xff\xd8" + scan)) == [(0xDA, 0)]
    assert list(jpeg_markers(b"\xff\xd8" + scan + b"\xff\xd9")) == [(0xDA, 0), (0xD9, 2_000_000)]
    assert file_structure(b"\xff\xd8" + scan + b"\xff\xd9", MAX_SEGMENTS, MAX_JPEG_SCANS) == (2, 1, 2_000_000)


def test_a_jpeg_padded_with_fill_or_junk_is_refused_before_pillow_walks_it(sample_dir):
    """Pillow steps over fill bytes in Python, ~0.6 us each (a 10 MB run: 6 s of a worker): past
    MAX_JPEG_FILL of them between segments, the file is refused; a little padding is read."""
    from service.core.preprocess import MAX_JPEG_FILL, ImageError, open_image

    jpeg = sample_images(sample_dir)[0].read_bytes()
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")  # after SOI and the APP0 segment
    for pad in (b"\xff", b"junk"):  # fill bytes, or junk libjpeg skips
        padded = lambda n, pad=pad: jpeg[:app0_end] + (pad * n)[:n] + jpeg[app0_end:]  # noqa: E731
        assert open_image(padded(1000)).size == open_image(jpeg).size
        assert open_image(padded(MAX_JPEG_FILL)).size == open_image(jpeg).size
        with pytest.raises(ImageError, match="fill or junk between its segments"):
            open_image(padded(MAX_JPEG_FILL + 1))


def test_malformed_exif_tags_do_not_flood_the_log(tmp_path):
    """Pillow warns once per malformed EXIF tag; a PNG whose eXIf chunk holds 20,000 of them wrote
    a log line each (65,000 lines for one 850 KB upload). Decoded in a fresh interpreter, which would
    print such warnings: none are."""
    import zlib

    from tests.hostile import encode

    entries = 20_000
    offset = 8 + 2 + 12 * entries + 4
    ifd = b"".join(struct.pack("<HHII", i, 7, 4000, offset) for i in range(entries))
    exif = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", entries) + ifd + b"\0" * 4 + b"A" * 4000
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    png = encode(Image.new("RGB", (300, 225)), "PNG")
    idat = png.index(b"IDAT") - 4
    (tmp_path / "x.png").write_bytes(png[:idat] + chunk + png[idat:])
    code = (
        "import sys; from pathlib import Path; from service.core.preprocess import decode_opened, open_image; "
        "decode_opened(open_image(Path(sys.argv[1]).read_bytes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr[-2000:]


# ---- the request guard: admission, part and body bounds, deadlines -------------------------------


class Inner:
    """An ASGI app that reads its whole body, then waits until released: a request held in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[int] = []

    async def __call__(self, scope, receive, send) -> None:
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        self.bodies.append(size)
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


INFER = "/v2/models/lesion/infer"


def guard_for(inner, **settings):
    from service.api.metrics import Metrics
    from service.api.middleware import RequestGuard
    from service.api.settings import Settings
    from service.api.state import ModelState

    limits = dict(max_upload_bytes=50_000, max_batch_bytes=100_000, max_metadata_bytes=100, max_inflight_bytes=600_000)
    return RequestGuard(inner, Settings(**{**limits, **settings}), Metrics(), ModelState(), {})


def http_scope(headers: dict[str, str], path: str = "/predict/batch") -> dict:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""}


async def call(
    guard, headers: dict[str, str], chunks: list[bytes], gap: float = 0.0, path: str = "/predict/batch"
) -> tuple[int, dict]:
    """Send a request through the guard; returns its status and headers (or an HTTPException's)."""
    from starlette.exceptions import HTTPException

    queue = list(chunks)

    async def receive():
        if gap:
            await asyncio.sleep(gap)
        body = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    out: dict = {}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], dict(message["headers"])

    try:
        await guard(http_scope(headers, path), receive, send)
    except HTTPException as exc:  # raised by the guard's receive, as the app's error handler would see it
        return exc.status_code, dict(exc.headers or {})
    return out["status"], out["headers"]


def test_admission_bounds_requests_and_bytes_in_flight_with_503_and_retry_after():
    async def scenario():
        inner = Inner()
        guard = guard_for(inner, max_inflight_requests=2)
        held = [asyncio.create_task(call(guard, {"content-length": "2000"}, [b"x" * 2000])) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert (guard.inflight_requests, guard.inflight_bytes) == (2, 4000)
        status, headers = await call(guard, {"content-length": "10"}, [b"x" * 10])  # a third request
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        inner.release.set()
        assert [s for s, _ in await asyncio.gather(*held)] == [200, 200]
        assert (guard.inflight_requests, guard.inflight_bytes) == (0, 0)  # released
        # bytes: requests that hold 290,000 of a 600,000 bound leave room for 310,000 more; a JSON
        # infer body costs 3.25 bytes a byte (Settings.body_cost), a binary one 2, a form 1
        inner = Inner()
        guard = guard_for(inner, max_inflight_bytes=600_000)
        first = asyncio.create_task(call(guard, {"content-length": "160000"}, [b"x" * 160_000]))
        json_infer = asyncio.create_task(call(guard, {"content-length": "40000"}, [b"x" * 40_000], path=INFER))
        await asyncio.sleep(0.05)
        assert guard.inflight_bytes == 160_000 + 130_000
        assert (await call(guard, {"content-length": "95385"}, [b"x" * 95_385], path=INFER))[0] == 503
        binary = {"content-length": "150000", "inference-header-content-length": "10"}
        fits = asyncio.create_task(call(guard, binary, [b"x" * 150_000], path=INFER))
        await asyncio.sleep(0.05)
        assert guard.inflight_bytes == 590_000
        inner.release.set()
        assert [s for s, _ in await asyncio.gather(first, json_infer, fits)] == [200, 200, 200]
        assert guard.inflight_bytes == 0
        # what a slow sender only declares is not held for it: it cannot starve the others
        inner = Inner()
        guard = guard_for(inner, max_inflight_bytes=600_000)
        slow = [asyncio.create_task(call(guard, {"content-length": "150000"}, [b"x"] * 10, gap=1.0)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert guard.inflight_requests == 3 and guard.inflight_bytes < 10
        inner.release.set()
        assert (await call(guard, {"content-length": "150000"}, [b"x" * 150_000]))[0] == 200
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)

    asyncio.run(scenario())


def test_the_admin_key_is_checked_before_the_body_is_read():
    async def scenario():
        inner = Inner()
        inner.release.set()
        guard = guard_for(inner, admin_key="a" * 20)
        scope = http_scope({"content-length": "100"}, path="/admin/bundle")
        sent: list = []

        async def never():
            raise AssertionError("the body was read")

        async def send(message):
            sent.append(message)

        await guard(scope, never, send)
        assert sent[0]["status"] == 401 and inner.bodies == []

    asyncio.run(scenario())


def test_chunked_bytes_count_against_the_bound_as_they_arrive():
    async def scenario():
        inner = Inner()
        inner.release.set()
        guard = guard_for(inner, max_inflight_bytes=600_000)
        guard.inflight_bytes = 550_000  # what other requests hold
        status, headers = await call(guard, {"transfer-encoding": "chunked"}, [b"x" * 30_000, b"x" * 30_000])
        assert status == 503 and headers["Retry-After"] == "1"
        assert (guard.inflight_requests, guard.inflight_bytes) == (0, 550_000)  # its own bytes released
        guard.inflight_bytes = 0
        assert (await call(guard, {"transfer-encoding": "chunked"}, [b"x" * 30_000, b"x" * 30_000]))[0] == 200

    asyncio.run(scenario())


def test_a_trickled_body_meets_the_total_deadline():
    async def scenario():
        inner = Inner()
        inner.release.set()
        guard = guard_for(inner, body_timeout_s=0.2, body_deadline_s=0.5)
        status, headers = await call(guard, {"content-length": "1000"}, [b"x"] * 1000, gap=0.05)  # 20 bytes/s
        assert status == 408 and headers["Connection"] == "close"
        assert inner.bodies == []  # the app never got a whole body
        status, _ = await call(guard, {"content-length": "10"}, [b"x"] * 10, gap=0.01)  # in time
        assert status == 200

    asyncio.run(scenario())


def test_settings_refuse_an_in_flight_bound_smaller_than_one_request():
    from pydantic import ValidationError

    from service.api.settings import Settings

    with pytest.raises(ValidationError, match="must hold one largest request"):
        Settings(max_batch_bytes=64 * 2**20, max_inflight_bytes=32 * 2**20)
    with pytest.raises(ValidationError, match="must hold one largest request"):  # a /predict body larger still
        Settings(max_upload_bytes=100 * 2**20, max_batch_bytes=2**20, max_inflight_bytes=64 * 2**20)


def test_an_oversized_part_is_refused_while_parsing_before_the_route_runs(app_factory, tiny_run, monkeypatch):
    from tests.helpers import png

    client = app_factory(tiny_run / "bundle", max_upload_bytes=200_000, max_batch_bytes=1_000_000)
    big = png(400, 400, noise=True)
    assert 200_000 < len(big) < 1_000_000

    def never(*args, **kwargs):
        raise AssertionError("the route read an oversized upload")

    monkeypatch.setattr("service.api.routes.predictions.read_upload", never)
    r = client.post("/predict/batch", files=[("images", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and "image file 'big.png' is over the 200000 byte limit" in r.json()["detail"]
    r = client.post("/predict/batch", files=[("images", (f"{i}.png", big[:150_000])) for i in range(8)])
    assert r.status_code == 413 and "request body is over" in r.json()["detail"]  # max_batch_bytes


# ---- bundle verification: every number finite and in range, regular files, bounded pickles ------


def rehash(bundle: Path, name: str, data: bytes) -> None:
    (bundle / name).write_bytes(data)
    rewrite_manifest(bundle, lambda m: m["files"].update({name: hashlib.sha256(data).hexdigest()}))


def set_key(path: list[str], value):
    def edit(m: dict) -> None:
        for k in path[:-1]:
            m = m[k]
        m[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, words",
    [
        (set_key(["ood", "thresholds", "mahalanobis"], float("nan")), "NaN is not a number a manifest may hold"),
        (set_key(["temperature"], float("inf")), "Infinity is not a number"),
        (set_key(["ood", "flag_share"], 2.0), "flag_share"),
        (set_key(["ood", "thresholds"], {"energy": 1.0}), "no threshold for the served method"),
        (set_key(["preprocessing", "std"], [0.2, 0.0, 0.2]), "std"),
        (set_key(["preprocessing", "width"], 100_000), "width"),
        (set_key(["features", "age_min"], 200.0), "age_min 200.0 is above age_max"),
        (set_key(["class_names"], {"nv": "naevus"}), "class_names lacks"),
        (set_key(["training_prevalence", "nv"], -1.0), "training_prevalence"),
        (set_key(["training_prevalence"], dict.fromkeys(CLASSES, 0.0)), "positive shares summing to 1"),
        (set_key(["temperature"], 1e-300), "temperature"),
    ],
)
def test_a_manifest_number_out_of_range_is_refused(tiny_run, tmp_path, edit, words):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    rewrite_manifest(bundle, edit)  # json.dumps writes NaN and Infinity as such
    with pytest.raises(BundleError, match=words):
        read_manifest(bundle)


def test_overflowing_and_deeply_nested_manifests_are_bundle_errors(tiny_run, tmp_path):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"temperature": 1.0', '"temperature": 1e999'))
    with pytest.raises(BundleError, match="1e999 is not a finite number"):
        read_manifest(bundle)
    (bundle / "manifest.json").write_text('{"format_version": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="nested too deeply"):
        read_manifest(bundle)


def test_bundle_files_must_be_regular_files_never_links(tiny_run, tmp_path):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    outside = tmp_path / "manifest.json"
    shutil.move(bundle / "manifest.json", outside)
    (bundle / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match="manifest.json is a symbolic link"):
        read_manifest(bundle)
    (bundle / "manifest.json").unlink()
    shutil.move(outside, bundle / "manifest.json")
    card = read_manifest(bundle).model_card
    (bundle / card).unlink()
    os.mkfifo(bundle / card)  # a reader of a FIFO would block forever
    with pytest.raises(BundleError, match="is not a regular file"):
        Predictor.load(bundle)
    linked = tmp_path / "current"  # the bundle folder itself may be a link (the `current` pattern)
    linked.symlink_to(tiny_run / "bundle")
    assert Predictor.load(linked).manifest.bundle_id


def npz_with(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_an_ood_fit_must_be_finite_and_fit_the_bundle(tiny_run, tmp_path):
    import zipfile

    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    name = read_manifest(bundle).ood.file
    with np.load(bundle / name) as z:
        means, precision = z["means"], z["precision"]
    nan = precision.copy()
    nan[0, 0] = np.nan
    cases = [
        (npz_with(means=means, precision=nan), "must be finite"),
        (npz_with(means=means[:3], precision=precision), r"must be \(7, D\)"),
        (npz_with(means=means, precision=-np.eye(len(precision))), "positive diagonal"),
        (npz_with(means=means), "not \\['means', 'precision'\\]"),
        (b"not a zip", "not a valid out-of-distribution fit"),
    ]
    # an .npy header that declares a 10^12-element array over a few bytes: refused, not allocated
    buf = __import__("io").BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
        header["shape"] = (10**6, 10**6)
        npy = __import__("io").BytesIO()
        np.lib.format.write_array_header_1_0(npy, header)
        z.writestr("means.npy", npy.getvalue() + b"\0" * 8)
        z.writestr("precision.npy", npy.getvalue() + b"\0" * 8)
    cases.append((buf.getvalue(), "which is not the data it holds"))
    for data, words in cases:
        rehash(bundle, name, data)
        with pytest.raises(BundleError, match=words):
            Predictor.load(bundle)


@pytest.mark.parametrize(
    "pickled, words",
    [
        (pickle.dumps({"not": "a model"}), "holds a builtins.dict, not a model"),
        (b"\x80\x04cbuiltins\nbytearray\nJ\x00\x2f\x68\x59\x85R.", "bytearray with a size over"),  # 1.5e9 bytes
        (b"\x80\x04cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a\x3b\x85C\x01b\x87R.", "size"),
        (  # a shape of 65,536^3, each side under the bound
            b"\x80\x04cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            b"(J\x00\x00\x01\x00J\x00\x00\x01\x00J\x00\x00\x01\x00tC\x01b\x87R.",
            "_reconstruct with a size over",
        ),
        (b"\x80\x04cnumpy\nndarray\n(J\xff\xff\xff\x7f\x85X\x02\x00\x00\x00u8tR.", "call numpy.ndarray"),
        (b"\x80\x04cnumpy\ndtype\nX\x0b\x00\x00\x00V1000000000\x89\x88\x87R.", "dtype with a size over"),
    ],
)
def test_a_pickle_that_is_no_model_or_asks_for_a_huge_allocation_is_refused(tiny_run, tmp_path, pickled, words):
    bundle = copy_bundle(tiny_run / "bundle", tmp_path / "b")
    rehash(bundle, read_manifest(bundle).stack.file, pickled)
    with pytest.raises(BundleError, match=words):
        Predictor.load(bundle)


def test_a_refused_swap_keeps_the_old_bundle_serving_and_says_why(app_factory, tiny_run, tmp_path, sample_dir):
    root = tmp_path / "bundles"
    bundle = copy_bundle(tiny_run / "bundle", root / "nan-threshold")
    rewrite_manifest(bundle, set_key(["ood", "thresholds", "mahalanobis"], float("nan")))
    client = app_factory(tiny_run / "bundle", admin_key="a" * 20, bundles_root=root)
    key = {"X-Admin-Key": "a" * 20}
    before = client.get("/model").json()["bundle_id"]
    r = client.post("/admin/bundle", json={"bundle": str(bundle)}, headers=key)
    assert r.status_code == 422 and "still serving the old one" in r.json()["detail"] and "NaN" in r.json()["detail"]
    for path in ("/tmp/a\x00b", "\ud800", "x" * 5000, str(root / ("a" * 300))):
        body = json.dumps({"bundle": path}).encode()  # ASCII, the surrogate escaped as JSON allows
        r = client.post("/admin/bundle", content=body, headers={**key, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path[:20], r.status_code, r.text)
    r = client.post(
        "/admin/bundle", content=b'{"bundle": ' + b"[" * 100_000, headers={**key, "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500
    assert client.get("/model").json()["bundle_id"] == before
    jpeg = sample_images(sample_dir)[0].read_bytes()
    assert client.post("/predict", files={"image": jpeg}).status_code == 200


def test_the_swap_loads_the_path_it_checked(tiny_run, tmp_path):
    """A link under the bundles root is resolved once; what loads is the resolved folder, so a link
    re-pointed after the check (outside the root) changes nothing."""
    from service.api.errors import ApiError
    from service.api.routes.admin import allowed_bundle
    from service.api.settings import Settings

    root = tmp_path / "bundles"
    target = copy_bundle(tiny_run / "bundle", root / "real")
    (root / "link").symlink_to(target)
    settings = Settings(bundle=tiny_run / "bundle", bundles_root=root)
    assert allowed_bundle(root / "link", settings) == target.resolve()
    assert allowed_bundle(None, settings) == (tiny_run / "bundle").resolve()
    (tmp_path / "outside").symlink_to(tiny_run / "bundle")
    assert allowed_bundle(tmp_path / "outside", settings) == (tiny_run / "bundle").resolve()  # the configured one
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(ApiError) as refused:
        allowed_bundle(root / "escape", settings)
    assert refused.value.status_code == 403


# ---- logs: one event, one line, no request data in a traceback ----------------------------------


def test_log_lines_cannot_be_forged_and_exceptions_carry_no_message():
    from service.api.logs import JsonLines, TextLines

    hostile = "\ud800\n2026-12-02T09:40:00+0000 INFO service.requests: request_id=FORGED status=200\r\x1b[2J\u2028"
    try:
        raise ValueError(f"metadata {hostile} SECRET")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    record = logging.makeLogRecord(
        {"name": "service", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "refused %s", "args": (hostile,)}
    )
    record.exc_info = exc_info
    text = TextLines().format(record)
    assert len(text.splitlines()) == 1 and "\r" not in text and "\x1b" not in text, text
    assert "\\n2026-12-02T09:40:00" in text and "ValueError at test_hostile.py" in text and "SECRET" not in text
    text.encode("utf-8")  # no lone surrogate left
    line = JsonLines().format(record)
    assert len(line.splitlines()) == 1 and line.isascii()
    parsed = json.loads(line)
    assert parsed["message"] == f"refused {hostile}" and "SECRET" not in parsed["exception"]


def test_library_warnings_become_log_records(tiny_run, caplog):
    import warnings

    from service.api.app import create_app
    from service.api.settings import Settings

    logging.captureWarnings(False)  # undo an earlier app's capture, made under another test's warning recorder
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="py.warnings"):
        warnings.simplefilter("always")
        create_app(Settings(bundle=tiny_run / "bundle"))
        warnings.warn("divide by zero\nforged", RuntimeWarning, stacklevel=1)
    logging.captureWarnings(False)
    assert any(r.name == "py.warnings" and "divide by zero" in r.getMessage() for r in caplog.records)


def test_a_500_logs_one_line_without_the_request_data(tiny_run, sample_dir):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.logs import TextLines
    from service.api.settings import Settings

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(TextLines())
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    jpeg = sample_images(sample_dir)[0].read_bytes()

    def bug(images, metadata):
        raise RuntimeError(f"a bug that quotes the request: {metadata}")

    try:
        with TestClient(create_app(Settings(bundle=tiny_run / "bundle")), raise_server_exceptions=False) as client:
            client.app.state.model.predictor.predict = bug
            meta = '{"site": "face", "age": 77}'
            r = client.post("/predict", files={"image": jpeg}, data={"metadata": meta})
    finally:
        logger.removeHandler(handler)
    assert r.status_code == 500
    errors = [line for line in lines if "unexpected error" in line or "prediction failed" in line]
    assert errors and all(len(line.splitlines()) == 1 for line in lines)
    assert not any("face" in line or "quotes the request" in line for line in lines), lines
    assert any("RuntimeError at" in line for line in errors)
