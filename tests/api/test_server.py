"""Scenario tier: the real server (uvicorn, `python -m service`) on the bundle trained on the real sample."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from service.core.predictor import Predictor
from service.core.preprocess import load_for_model
from tests.helpers import REPO, free_port, metric_total, sample_images

pytestmark = pytest.mark.scenario


@pytest.fixture(scope="module")
def smoke_predictor(smoke_run):
    return Predictor.load(smoke_run / "bundle")


def offline_served(predictor, data: bytes, meta: dict) -> np.ndarray:
    img = load_for_model(data, predictor.manifest.preprocessing)
    return predictor.predict(img[None], [meta])[0].probabilities


def test_http_answers_match_offline_inference(server, smoke_predictor, sample_dir):
    classes = smoke_predictor.manifest.classes
    path = sample_images(sample_dir)[1]
    big = Image.open(path).resize((600, 450), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    for data, meta in ((path.read_bytes(), {"age": 45, "sex": "male", "site": "back"}), (buf.getvalue(), {"age": 60})):
        r = httpx.post(server + "/predict", files={"image": data}, data={"metadata": json.dumps(meta)}, timeout=30)
        assert r.status_code == 200, r.text
        got = np.array([r.json()["probabilities"][c] for c in classes])
        assert np.abs(got - offline_served(smoke_predictor, data, meta)).max() <= 1e-5


def test_concurrent_requests_each_get_their_own_answer(server, sample_dir):
    paths = sample_images(sample_dir, 4)

    def call(i):
        p = paths[i % len(paths)]
        return i % len(paths), httpx.post(server + "/predict", files={"image": p.read_bytes()}, timeout=60).json()[
            "probabilities"
        ]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    by_image: dict[int, list] = {}
    for i, probs in results:
        by_image.setdefault(i, []).append(probs)
    assert len(by_image) == len(paths)
    for probs in by_image.values():  # batched with different neighbours: equal up to float rounding
        assert all(np.allclose([p[c] for c in sorted(p)], [probs[0][c] for c in sorted(p)], atol=1e-5) for p in probs)
    assert len({json.dumps(v[0], sort_keys=True) for v in by_image.values()}) == len(paths)  # different images differ


def run_service(bundle) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "--bundle", str(bundle), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def edited_copy(bundle, dest, edit) -> None:
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["library_versions"].update(xgboost="1.7.6"), "written with xgboost 1.7.6"),
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m["boosters"][0].update(file="evil.pkl"), "is not among the hashed files"),
        (lambda m: m["files"].update({"../outside.pkl": "0" * 64}), "is not a plain name"),
        (lambda m: m.update(served="nonexistent"), "served model 'nonexistent'"),
        (lambda m: m["library_versions"].pop("catboost"), "library_versions lacks ['catboost']"),
    ],
)
def test_bad_manifests_stop_startup_with_one_line(smoke_run, tmp_path, edit, words):
    edited_copy(smoke_run / "bundle", tmp_path / "b", edit)
    out = run_service(tmp_path / "b")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and words in out.stderr, out.stderr


def test_missing_or_tampered_files_stop_startup(smoke_run, tmp_path):
    out = run_service(tmp_path / "nope")
    assert out.returncode == 2 and "does not exist" in out.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(smoke_run / "bundle", tampered)
    with open(tampered / "xgboost.pkl", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    out = run_service(tampered)
    assert out.returncode == 2 and "xgboost.pkl does not match its sha256" in out.stderr
    (tampered / "cnn.onnx").unlink()
    assert "cnn.onnx is missing" in run_service(tampered).stderr


# ---- the Python client, against the same real server ----------------------------------------


def test_client_command_table_json_and_score(server, smoke_predictor, sample_dir, subset, tmp_path, capsys):
    from lesion_client.cli import main as client_main

    img = str(sample_images(sample_dir)[0])
    assert client_main(["predict", img, "--age", "50", "--sex", "male", "--site", "back", "--url", server]) == 0
    out = capsys.readouterr().out
    assert "malignant probability" in out and "stack" in out and "Research use only" in out
    assert client_main(["predict", img, "--url", server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"]
    second = str(sample_images(sample_dir)[1])
    assert client_main(["predict", img, second, "--url", server, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {img, second}
    assert client_main(["predict", img, second, "--lesion", "L1", "--url", server]) == 0
    out = capsys.readouterr().out
    assert "lesion L1: " in out and "from 2 image(s)" in out
    d = subset(2)
    images = sorted((d / "images").iterdir())
    images[1].write_bytes(b"not an image")  # one bad file: its own error row, not the end of the run
    for source in (d / "images", d / "HAM10000_metadata.csv"):
        out_csv = tmp_path / f"{source.name}.csv"
        assert client_main(["score", str(source), "--out", str(out_csv), "--url", server]) == 1  # a row failed
        rows = list(csv.DictReader(open(out_csv)))
        assert len(rows) == len(images)
        assert {"label", "malignant_probability", "p_mel", "error"} <= set(rows[0])
        bad = [r for r in rows if r["error"]]
        assert len(bad) == 1 and "not a readable image" in bad[0]["error"]
    assert {"image_id", "lesion_id", "dx"} <= set(rows[0])  # the CSV's own columns are carried
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in csv.DictReader(open(source))]  # input order
    by_id = {r["image_id"]: r for r in rows}  # a CSV with lesion_id: each row also has its lesion's answer
    classes, rule = smoke_predictor.manifest.classes, smoke_predictor.manifest.lesion_rule
    assert rule in ("mean", "log_mean")
    for r in rows:
        mates = [m for m in rows if m["lesion_id"] == r["lesion_id"] and not m["error"]]
        if not r["error"]:
            assert r["lesion_label"] and int(r["lesion_images"]) == len(mates), r
            # the lesion's answer: its images' answers in this CSV, combined by hand by the bundle's rule
            p = np.array([[float(m[f"p_{c}"]) for c in classes] for m in mates])
            want = p.mean(0) if rule == "mean" else np.exp(np.log(p).mean(0))
            want = want / want.sum()
            np.testing.assert_allclose([float(r[f"lesion_p_{c}"]) for c in classes], want, atol=1e-6)
            assert r["lesion_label"] == classes[int(np.argmax(want))]
    assert any(int(r["lesion_images"]) >= 2 for r in rows if not r["error"])  # where the rules differ
    # resumable: a rerun keeps the answered rows and retries the error row with the rest of its lesion
    images[1].write_bytes(images[0].read_bytes())
    lesion = by_id[images[1].stem]["lesion_id"]
    redo = sum(r["lesion_id"] == lesion for r in rows)
    assert client_main(["score", str(d / "HAM10000_metadata.csv"), "--out", str(out_csv), "--url", server]) == 0
    out = capsys.readouterr().out
    assert f"{len(images) - redo} rows were already answered" in out and f"{redo} images scored" in out
    assert len(list(csv.DictReader(open(out_csv)))) == len(images)
    # two JPEGs are not a CSV: a clear error, not a UnicodeDecodeError
    assert client_main(["score", str(images[0]), "--out", str(tmp_path / "x.csv"), "--url", server]) == 1
    assert "is an image" in capsys.readouterr().err


def test_client_and_cli_carry_every_caveat_the_server_answers(server, sample_dir, tmp_path, capsys, monkeypatch):
    """A black image: the server flags it and warns; the client's result, the CLI's table and JSON,
    and the scoring CSV all carry that, with the prior, the request id and the explanation."""
    from lesion_client import LesionClient
    from lesion_client.cli import main as client_main

    from tests.helpers import png

    black = tmp_path / "black.png"
    black.write_bytes(png(200, 150))
    with LesionClient(server) as c:
        p = c.predict(black, prior="training", explain=True)
        assert p.warnings and p.flagged and p.ood is not None and p.prior == "training" and p.request_id
        assert p.explanation is not None and p.explanation.heatmap_png.startswith(b"\x89PNG")
        (batch,) = c.predict_batch([black], prior={c_: 1 / 7 for c_ in c.model()["classes"]})
        assert batch.prior == "custom" and batch.warnings == p.warnings
    monkeypatch.chdir(tmp_path)
    assert client_main(["predict", str(black), "--url", server, "--explain", "--prior", "training"]) == 0
    out = capsys.readouterr().out
    assert "WARNING:" in out and "prior training" in out and "request id" in out
    assert ("FLAGGED" in out) == (p.ood is not None and p.ood.flagged)
    assert (tmp_path / "black.heatmap.png").read_bytes().startswith(b"\x89PNG") and "heatmap of" in out
    assert client_main(["predict", str(black), "--url", server, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["warnings"] == p.warnings and as_json["ood"]["flagged"] == p.ood.flagged and as_json["request_id"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "black.png").write_bytes(black.read_bytes())
    (folder / "real.jpg").write_bytes(sample_images(sample_dir)[0].read_bytes())
    assert client_main(["score", str(folder), "--out", str(tmp_path / "s.csv"), "--url", server]) == 0
    capsys.readouterr()
    rows = {r["image"]: r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert rows["black.png"]["warnings"] and rows["black.png"]["request_id"] and rows["black.png"]["ood_score"]
    assert rows["black.png"]["ood_flagged"] in ("true", "false") and rows["real.jpg"]["prior"] == "balanced"
    with pytest.raises(SystemExit):
        client_main(["--version"])
    assert capsys.readouterr().out.startswith("lesion-client ")


def test_client_errors_carry_the_server_message(server, sample_dir, capsys):
    from lesion_client import LesionAPIError, LesionClient
    from lesion_client.cli import main as client_main

    with LesionClient(server) as c:
        with pytest.raises(LesionAPIError) as err:
            c.predict(sample_images(sample_dir)[0], sex="robot")
        assert err.value.status == 422 and "use one of: male, female, unknown" in err.value.detail
        assert c.model()["classes"][0] == "akiec"
        paths = sample_images(sample_dir, 2)
        assert [p.filename for p in c.predict_batch([paths[0], paths[1].read_bytes()], [{"age": 40}, {}])] == [
            paths[0].name,
            "image1",
        ]
    assert client_main(["predict", str(sample_images(sample_dir)[0]), "--url", server, "--sex", "robot"]) == 1
    assert "use one of" in capsys.readouterr().err


def test_two_workers_report_all_traffic_in_one_scrape(smoke_run, sample_dir):
    """Multiprocess metrics: whichever worker answers the scrape counts both workers' requests and
    answers; each live worker's drift gauge is its own series (pid), never a sum of the two."""
    import re

    import httpx

    from tests.helpers import sample_images, start_server, variants

    proc, url = start_server(smoke_run / "bundle", env={"LESION_WORKERS": "2", "LESION_DRIFT_WINDOW": "10"})
    n = 40
    images = variants(sample_images(sample_dir, 1)[0], n)  # one image, altered: one class (drift counts a copy once)
    try:
        with httpx.Client() as http:
            for image in images:
                with httpx.Client() as fresh:  # one connection per request: the kernel spreads them over workers
                    assert fresh.get(url + "/model").status_code == 200
                    assert fresh.post(url + "/predict", files={"image": image}).status_code == 200
            text = http.get(url + "/metrics").text
            assert metric_total(text, "lesion_answers_total") == n
            psi = re.findall(r'lesion_drift_psi\{bundle_id="[^"]+",pid="\d+",signal="label"\} (\S+)', text)
            assert 1 <= len(psi) <= 2 and all(float(v) > 0.25 for v in psi), text[-3000:]  # one image: all one class
            for _ in range(4):
                text = http.get(url + "/metrics").text
                counted = sum(
                    float(v)
                    for v in re.findall(r'lesion_http_requests_total\{route="/model",status="200"\} (\S+)', text)
                )
                assert counted == n, text[:2000]
                bundle_id = httpx.get(url + "/health/ready").json()["bundle_id"]
                assert f'lesion_model_info{{bundle_id="{bundle_id}"}} 1.0' in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_bundle_swap_under_load_fails_no_request(smoke_run, tiny_run, sample_dir, tmp_path):
    """Clients keep sending while the service swaps to another bundle, then refuses a tampered one:
    every request succeeds, and each response names the bundle that answered it."""
    import json
    import os
    import shutil
    import threading
    import time

    import httpx

    from tests.helpers import sample_images, start_server

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run / "bundle", bad)
    (bad / "stack.pkl").write_bytes(b"tampered")
    key = {"X-API-Key": "k" * 24}
    admin = {**key, "X-Admin-Key": "a" * 24}
    env = {"LESION_API_KEY": key["X-API-Key"], "LESION_ADMIN_KEY": admin["X-Admin-Key"]}
    env["LESION_BUNDLES_ROOT"] = os.path.commonpath([tiny_run, bad])
    proc, url = start_server(smoke_run / "bundle", env=env)
    image = sample_images(sample_dir, 1)[0].read_bytes()
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(headers=key, timeout=60) as http:
            while not stop.is_set():
                r = http.post(url + "/predict", files={"image": ("a.jpg", image)})
                answers.append((r.status_code, r.json().get("model", {}).get("bundle_id")))

    old = json.loads((smoke_run / "bundle" / "manifest.json").read_text())["bundle_id"]
    new = json.loads((tiny_run / "bundle" / "manifest.json").read_text())["bundle_id"]
    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while len(answers) < 20:
            time.sleep(0.05)
        target = {"bundle": str(tiny_run / "bundle")}
        assert (
            httpx.post(url + "/admin/bundle", json=target, headers=key).status_code == 401
        )  # the API key is not enough
        outside = httpx.post(url + "/admin/bundle", json={"bundle": "/etc"}, headers=admin)
        assert outside.status_code == 403 and "LESION_BUNDLES_ROOT" in outside.json()["detail"]
        r = httpx.post(url + "/admin/bundle", json=target, headers=admin, timeout=120)
        assert r.status_code == 200 and r.json() == {"previous": old, "serving": new}
        swapped_at = len(answers)
        while len(answers) < swapped_at + 20:
            time.sleep(0.05)
        r = httpx.post(url + "/admin/bundle", json={"bundle": str(bad)}, headers=admin, timeout=120)
        assert r.status_code == 422 and "still serving the old one" in r.json()["detail"]
        refused_at = len(answers)
        while len(answers) < refused_at + 20:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        metrics = httpx.get(url + "/metrics", headers=key).text
        proc.terminate()
        proc.wait(30)
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]
    ids = [b for _, b in answers]
    assert ids[:10] == [old] * 10 and set(ids[swapped_at + 4 :]) == {new}  # a few in flight finish on the old one
    assert set(ids) == {old, new}
    assert f'lesion_model_info{{bundle_id="{new}"}} 1.0' in metrics
    assert f'lesion_model_info{{bundle_id="{old}"}} 0.0' in metrics
