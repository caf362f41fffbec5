"""The client package without a server: typed results, retries, errors, environment, chunking, scoring."""

from __future__ import annotations

import asyncio
import csv
import json
import re

import httpx
import pytest
from lesion_client import (
    AsyncLesionClient,
    LesionAPIError,
    LesionClient,
    LesionConnectionError,
    LesionError,
    LesionFailed,
    LesionTimeout,
    Prediction,
)
from lesion_client.scoring import score

from tests.helpers import free_port

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ENVELOPE = {
    "model": {"bundle_id": "b1", "created_at": "now", "synthetic_data": False},
    "request_id": "r1",
    "notice": "Research use only.",
}


def triage(point: str = "sensitivity-0.95") -> dict:
    return {
        "decision": "refer",
        "point": point,
        "score": 0.3,
        "threshold": 0.21,
        "sensitivity": 0.95,
        "specificity": 0.6,
        "reason": "refer: malignant probability 0.300 >= 0.210",
    }


def answer(filename: str | None = None, point: str = "sensitivity-0.95") -> dict:
    probs = {c: (0.4 if c == "nv" else 0.1) for c in CLASSES}
    return {
        "triage": triage(point),
        "label": "nv",
        "label_name": "Melanocytic nevus",
        "probabilities": probs,
        "malignant_probability": 0.3,
        "served_by": "stack",
        "components": {"stack": probs},
        "filename": filename,
    }


class FakeService:
    """Enough of the API for the client: /model with limits, /predict, /predict/batch (a part whose
    bytes contain BAD gets its own error entry, as the real service answers; WHOLE refuses the
    whole request, as a request over the server's pixel budget is)."""

    def __init__(self, max_batch: int = 2, max_batch_bytes: int | None = None) -> None:
        self.max_batch, self.max_batch_bytes, self.requests = max_batch, max_batch_bytes, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/model":
            limits = {"max_batch": self.max_batch, "max_batch_bytes": self.max_batch_bytes}
            return httpx.Response(200, json={"classes": CLASSES, "limits": limits})
        body = request.read()
        if b"WHOLE" in body:
            return httpx.Response(413, json={"detail": "the images decode to too many pixels", "request_id": "r3"})
        named = re.search(rb'name="triage_point"\r\n\r\n(.*?)\r\n--', body, re.S)
        point = named.group(1).decode() if named else "sensitivity-0.95"
        if request.url.path == "/predict":
            if b"BAD" in body:
                return httpx.Response(400, json={"detail": "image BAD: not a readable image", "request_id": "r2"})
            return httpx.Response(200, json={**answer(point=point), **ENVELOPE})
        parts = re.findall(rb'filename="([^"]*)"[^\n]*\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--', body, re.S)
        assert len(parts) <= self.max_batch, "the client must chunk to the server's limit"
        error = {"status": 400, "code": "image-invalid", "detail": "image BAD: not a readable image"}
        items = [
            {"filename": n.decode(), "error": error} if b"BAD" in d else answer(n.decode(), point) for n, d in parts
        ]
        ids = re.search(rb'name="lesion_ids"\r\n\r\n(.*?)\r\n--', body, re.S)
        if ids is None:
            return httpx.Response(200, json={"predictions": items, **ENVELOPE})
        groups: dict[str, list[int]] = {}
        for j, lesion in enumerate(json.loads(ids.group(1))):
            if lesion is not None:
                groups.setdefault(lesion, []).append(j)
        lesions = [  # the served answer of its first image, as if combined; "error" when none was answered
            {
                "lesion_id": k,
                "images": js,
                "combined_by": "mean",
                "prior": "balanced",
                "warnings": [],
                **answer(point=point),
            }
            if any("error" not in items[j] for j in js)
            else {"lesion_id": k, "unanswered": js, "error": {**error, "code": "lesion-unanswered"}}
            for k, js in groups.items()
        ]
        return httpx.Response(200, json={"predictions": items, "lesions": lesions, **ENVELOPE})

    @property
    def batch_sizes(self) -> list[int]:
        return [len(re.findall(rb'name="images"', r.read())) for r in self.requests if r.url.path == "/predict/batch"]


def test_results_are_typed_and_batches_are_chunked_to_the_server_limit(tmp_path):
    fake = FakeService(max_batch=2)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"jpeg")
    with LesionClient("http://svc", transport=httpx.MockTransport(fake)) as c:
        one = c.predict(path, age=50, sex="male")
        many = c.predict_batch([path, b"x", b"y", path, b"z"])
    assert isinstance(one, Prediction) and one.label == "nv" and one.model.bundle_id == "b1"
    assert len(many) == 5 and fake.batch_sizes == [2, 2, 1]
    assert [p.filename for p in many] == ["a.jpg", "image1", "image2", "a.jpg", "image4"]  # bytes: their position


def test_batches_are_chunked_to_the_server_byte_limit_too(tmp_path):
    fake = FakeService(max_batch=10, max_batch_bytes=100)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"j" * 60)
    with LesionClient("http://svc", transport=httpx.MockTransport(fake)) as c:
        many = c.predict_batch([b"a" * 40, b"b" * 40, path, b"c" * 150, b"d" * 10, b"e" * 10])
    assert len(many) == 6 and fake.batch_sizes == [2, 1, 1, 2]  # 80 | 60 | 150 alone | 20


def test_retries_503_then_succeeds_sync_and_async():
    def flaky():
        calls = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(1)
            if len(calls) < 3:
                return httpx.Response(503, json={"detail": "model is still loading"})
            return httpx.Response(200, json={"classes": CLASSES})

        return calls, handler

    calls, handler = flaky()
    with LesionClient("http://svc", retries=3, backoff=0.001, transport=httpx.MockTransport(handler)) as c:
        assert c.model()["classes"] == CLASSES and len(calls) == 3

    async def run() -> None:
        acalls, ahandler = flaky()
        async with AsyncLesionClient(
            "http://svc", retries=3, backoff=0.001, transport=httpx.MockTransport(ahandler)
        ) as c:
            assert (await c.model())["classes"] == CLASSES and len(acalls) == 3

    asyncio.run(run())


def test_every_failure_is_the_clients_own_exception():
    with LesionClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.001) as c:
        with pytest.raises(LesionConnectionError, match="cannot reach"):
            c.model()

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with LesionClient("http://svc", retries=0, transport=httpx.MockTransport(slow)) as c:
        with pytest.raises(LesionTimeout):
            c.model()
    problem = {"detail": "sex: use one of", "request_id": "q", "code": "metadata-invalid", "status": 422}
    refused = httpx.MockTransport(lambda r: httpx.Response(422, json=problem))
    with LesionClient("http://svc", transport=refused) as c:
        with pytest.raises(LesionAPIError) as err:
            c.predict(b"x", sex="robot")
    assert err.value.status == 422 and err.value.detail == "sex: use one of" and err.value.request_id == "q"
    assert err.value.code == "metadata-invalid"
    plain = httpx.MockTransport(lambda r: httpx.Response(502, text="bad gateway"))  # a proxy's page, no problem body
    with LesionClient("http://svc", retries=0, transport=plain) as c:
        with pytest.raises(LesionAPIError) as err:
            c.model()
    assert err.value.code == "http-502" and err.value.detail == "bad gateway"


def test_url_and_key_come_from_the_environment(monkeypatch):
    seen = []
    monkeypatch.setenv("LESION_URL", "http://from-env:9000/")
    monkeypatch.setenv("LESION_API_KEY", "k3y")

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("x-api-key")))
        return httpx.Response(200, json={})

    with LesionClient(transport=httpx.MockTransport(handler)) as c:
        c.model()
    assert seen == [("http://from-env:9000/model", "k3y")]


def run_score(fake: FakeService, source, out):
    async def go():
        async with AsyncLesionClient("http://svc", transport=httpx.MockTransport(fake)) as c:
            return await score(c, source, out, in_flight=3)

    return asyncio.run(go())


def write_metadata(data, rows: list[dict]) -> None:
    with open(data / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_scoring_never_aborts_over_a_row_and_a_rerun_retries_the_error_rows(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i in range(7):
        (data / "images" / f"ISIC_{i}.jpg").write_bytes(b"BAD" if i == 3 else b"jpeg")
        rows.append({"image_id": f"ISIC_{i}", "lesion_id": f"L{i}", "dx": "nv", "age": "40", "sex": "male"})
    rows[5]["age"] = "forty"  # bad metadata: that row's error, not the end of the run
    rows.append({"image_id": "ISIC_404", "lesion_id": "L9", "dx": "mel", "age": "", "sex": "female"})  # no image
    write_metadata(data, rows)
    out = tmp_path / "out.csv"
    fake = FakeService(max_batch=2)
    summary = run_score(fake, data / "HAM10000_metadata.csv", out)
    assert (summary.scored, summary.errors, summary.without_image, summary.already_done) == (5, 3, 1, 0)
    written = list(csv.DictReader(open(out)))
    assert [r["image_id"] for r in written] == [r["image_id"] for r in rows]  # input order, every row
    got = {r["image_id"]: r for r in written}
    assert got["ISIC_3"]["error"] == "image BAD: not a readable image" and got["ISIC_3"]["label"] == ""
    assert "age 'forty' is not a number" in got["ISIC_5"]["error"]
    assert "no image file ISIC_404" in got["ISIC_404"]["error"]
    assert got["ISIC_0"]["lesion_id"] == "L0" and got["ISIC_0"]["p_nv"] == "0.4" and got["ISIC_0"]["request_id"] == "r1"
    assert fake.batch_sizes == [2, 2, 2]  # the bad image's request answered the others: nothing sent twice

    (data / "images" / "ISIC_3.jpg").write_bytes(b"jpeg")  # fixed: the rerun retries the error rows only
    again = FakeService()
    summary = run_score(again, data / "HAM10000_metadata.csv", out)
    assert (summary.already_done, summary.scored, summary.errors) == (5, 1, 2) and again.batch_sizes == [1]
    written = list(csv.DictReader(open(out)))
    assert [r["image_id"] for r in written] == [r["image_id"] for r in rows]
    assert not {r["image_id"]: r for r in written}["ISIC_3"]["error"]


def test_a_request_refused_whole_is_retried_image_by_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, content in enumerate([b"jpeg", b"WHOLE", b"jpeg"]):
        (folder / f"img{i}.jpg").write_bytes(content)
    fake = FakeService(max_batch=3)
    summary = run_score(fake, folder, tmp_path / "out.csv")
    assert (summary.scored, summary.errors) == (2, 1)
    rows = {r["image"]: r for r in csv.DictReader(open(tmp_path / "out.csv"))}
    assert "too many pixels" in rows["img1.jpg"]["error"] and rows["img0.jpg"]["label"] == "nv"


def test_the_score_command_exits_1_when_rows_failed_and_hints_on_ctrl_c(tmp_path, capsys, monkeypatch):
    from lesion_client import cli

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"BAD")
    transport = httpx.MockTransport(FakeService())
    real = cli.AsyncLesionClient
    monkeypatch.setattr(cli, "AsyncLesionClient", lambda *a, **k: real(*a, **k, transport=transport))
    assert cli.main(["score", str(folder), "--out", str(tmp_path / "o.csv")]) == 1
    out = capsys.readouterr()
    assert "0 images scored, 1 rows with an error" in out.out and "rerun the same command" in out.err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "score", interrupted)
    assert cli.main(["score", str(folder), "--out", str(tmp_path / "o.csv")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().out


def test_batch_results_map_answers_and_per_image_errors(tmp_path):
    from lesion_client import Failed

    with LesionClient("http://svc", transport=httpx.MockTransport(FakeService(max_batch=4))) as c:
        out = c.predict_batch([b"jpeg", b"BAD", b"jpeg"])
    assert isinstance(out[0], Prediction) and isinstance(out[2], Prediction)
    assert isinstance(out[1], Failed) and out[1].code == "image-invalid" and out[1].status == 400
    assert out[1].request_id == "r1" and out[1].filename == "image1"


def test_scoring_refuses_an_image_as_its_source(tmp_path):
    from lesion_client import LesionError

    img = tmp_path / "a.jpg"
    img.write_bytes(b"\xff\xd8\xff")
    with pytest.raises(LesionError, match="is an image"):
        run_score(FakeService(), img, tmp_path / "out.csv")


def test_a_run_killed_mid_line_resumes_without_losing_or_merging_rows(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"img{i}.jpg").write_bytes(b"jpeg")
    out = tmp_path / "out.csv"
    run_score(FakeService(max_batch=4), folder, out)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]) + lines[3][:12])  # header, 2 rows, then half a row: a kill mid-write
    summary = run_score(FakeService(max_batch=4), folder, out)
    assert summary.already_done == 2 and summary.scored == 2
    rows = list(csv.DictReader(open(out)))
    assert sorted(r["image"] for r in rows) == [f"img{i}.jpg" for i in range(4)]
    assert all(r["p_nv"] == "0.4" and None not in r.values() for r in rows)


def test_scoring_settings_and_inputs_a_user_can_get_wrong(tmp_path):
    from lesion_client import LesionError

    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(LesionError, match="at least 1"):
        asyncio.run(
            score(
                AsyncLesionClient("http://svc", transport=httpx.MockTransport(FakeService())),
                tmp_path,
                tmp_path / "o.csv",
                in_flight=0,
            )
        )
    with pytest.raises(LesionError, match="cannot write"):
        run_score(FakeService(), tmp_path, tmp_path / "missing-folder" / "o.csv")


def test_a_lesions_images_travel_in_one_request_and_map_back_to_the_callers_order():
    fake = FakeService(max_batch=3)
    ids = ["A", "B", "A", "C", "C", "B", None]
    images = [b"jpeg", b"jpeg", b"jpeg", b"BAD", b"BAD", b"jpeg", b"jpeg"]
    with LesionClient("http://svc", transport=httpx.MockTransport(fake)) as c:
        out = c.predict_lesions(images, ids, prior="training")
        assert fake.batch_sizes == [2, 2, 3]  # A; B (A + B would be 4 > 3); C with the unnamed image
        assert out.lesions["A"].images == (0, 2) and out.lesions["B"].images == (1, 5)
        assert isinstance(out.lesions["C"], LesionFailed) and out.lesions["C"].unanswered == (3, 4)
        assert [type(p).__name__ for p in out.images] == ["Prediction"] * 3 + ["Failed"] * 2 + ["Prediction"] * 2
        with pytest.raises(LesionError, match="lesion 'A' has 4 images, over the server's 3 per request"):
            c.predict_lesions([b"jpeg"] * 4, ["A"] * 4)
        with pytest.raises(LesionError, match="2 images but 1 lesion ids"):
            c.predict_lesions([b"jpeg"] * 2, ["A"])


def test_scoring_a_csv_with_lesion_ids_adds_each_lesions_answer_and_resumes_lesions_whole(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lesions = ["L1", "L2", "L1", "L3", "L2", "L1"]
    rows = []
    for i, lesion in enumerate(lesions):
        (data / "images" / f"ISIC_{i}.jpg").write_bytes(b"BAD" if i == 4 else b"jpeg")
        rows.append({"image_id": f"ISIC_{i}", "lesion_id": lesion, "dx": "nv"})
    write_metadata(data, rows)
    out = tmp_path / "out.csv"
    fake = FakeService(max_batch=3)
    summary = run_score(fake, data / "HAM10000_metadata.csv", out)
    assert (summary.scored, summary.errors) == (5, 1) and fake.batch_sizes == [3, 3]
    got = {r["image_id"]: r for r in csv.DictReader(open(out))}
    assert got["ISIC_0"]["lesion_label"] == "nv" and got["ISIC_5"]["lesion_p_nv"] == "0.4"
    assert got["ISIC_0"]["lesion_images"] == "3"  # its lesion's three images, all in one request

    (data / "images" / "ISIC_4.jpg").write_bytes(b"jpeg")  # fixed: its lesion (L2) is scored again whole
    again = FakeService(max_batch=3)
    summary = run_score(again, data / "HAM10000_metadata.csv", out)
    assert (summary.already_done, summary.scored, summary.errors) == (4, 2, 0) and again.batch_sizes == [2]
    written = list(csv.DictReader(open(out)))
    assert [r["image_id"] for r in written] == [r["image_id"] for r in rows]
    assert {r["image_id"]: r for r in written}["ISIC_1"]["lesion_images"] == "2"


def test_every_answer_carries_its_triage_at_the_point_asked_for(tmp_path, capsys, monkeypatch):
    from lesion_client import Triage
    from lesion_client import cli as cli_module

    fake = FakeService()
    client = LesionClient("http://x", transport=httpx.MockTransport(fake), retries=0)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"jpeg")
    p = client.predict(image, triage_point="sensitivity-0.98")
    assert p.triage == Triage("refer", "sensitivity-0.98", 0.3, 0.21, 0.95, 0.6, triage()["reason"]) and p.triage.refer
    assert client.predict(image).triage.point == "sensitivity-0.95"  # no field sent: the bundle's default
    assert b'name="triage_point"' not in fake.requests[-1].read()
    (b,) = client.predict_batch([image], triage_point="sensitivity-0.9")
    assert isinstance(b, Prediction) and b.triage.point == "sensitivity-0.9"
    lesions = client.predict_lesions([image, image], ["L", "L"], triage_point="sensitivity-0.9").lesions
    assert lesions["L"].triage.point == "sensitivity-0.9"

    monkeypatch.setattr(cli_module, "LesionClient", lambda *a, **k: client)
    assert cli_module.main(["predict", str(image), "--triage-point", "sensitivity-0.98"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  triage: REFER at sensitivity-0.98 (catches 95% of malignant lesions")

    out_csv = tmp_path / "out.csv"
    asyncio.run(score(AsyncLesionClient("http://x", transport=httpx.MockTransport(fake)), tmp_path, out_csv))
    (row,) = list(csv.DictReader(out_csv.open()))
    assert row["triage"] == "refer" and row["triage_point"] == "sensitivity-0.95" and row["triage_reason"]
