"""Every problem code the prediction routes document (service/api/routes/predictions.py `ERRORS`,
/health/ready's not-ready) on a request that produces it, with its whole RFC 9457 body: the status,
the stable `code`, `type` = urn:lesion-classifier:problem:<code>, a `detail` naming the problem and
the request id; busy also says when to retry. In process: the guard's refusals (a body too large,
too slow, a worker too busy) are driven through the app's own event loop with an ASGI exchange whose
client stalls, so the deadline, not the machine's speed, decides."""

from __future__ import annotations

import json
import re
import shutil
from functools import cached_property
from typing import NamedTuple

import anyio
import pytest
from PIL import Image

from tests.conftest import MAX_PIXELS
from tests.helpers import png, sample_images
from tests.hostile import encode

TYPE = "urn:lesion-classifier:problem:"
STALL = 0.3  # the apps' body_timeout_s where a client stalls for good: only the deadline can end it
PART = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def answered(r) -> Answer:
    return Answer(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


async def exchange(app, path: str, headers: dict[str, str], chunks: list[bytes], started=None) -> Answer:
    """One request straight into the ASGI app: the chunks, then a client that sends nothing more and
    never disconnects first; `started` is set when the app first reads the body (the guard admitted it)."""
    queue, sent, done = list(chunks), [], anyio.Event()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }

    async def receive():
        if started is not None:
            started.set()
        if queue:
            return {"type": "http.request", "body": queue.pop(0), "more_body": True}
        await done.wait()  # the stalled client: only the app's answer ends the wait
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    with anyio.fail_after(60):  # a broken deadline fails the test instead of hanging it
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body)


def stalled_body(client) -> Answer:
    """A body that stops arriving after its first part's headers."""
    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": "100000"}
    return client.portal.call(exchange, client.app, "/predict", headers, [PART])


def busy(client) -> Answer:
    """With room for one request in flight, a second request while a stalled one is held."""

    async def scenario():
        started = anyio.Event()
        headers = {"content-type": "multipart/form-data; boundary=b", "content-length": "100000"}
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(exchange, client.app, "/predict", headers, [PART], started)
            await started.wait()  # admitted: it holds the worker's one place
            second = await exchange(client.app, "/predict", {"content-length": "10"}, [b"x" * 10])
            tasks.cancel_scope.cancel()  # the held request goes away
        return second

    return client.portal.call(scenario)


class Apps:
    """The in-process apps the cases need, each started on first use (module-wide)."""

    def __init__(self, app_factory, tiny_run, tmp_path_factory, sample_dir):
        self.make, self.bundle, self.tmp, self.sample_dir = (
            app_factory,
            tiny_run / "bundle",
            tmp_path_factory,
            sample_dir,
        )

    @cached_property
    def jpeg(self) -> bytes:
        return sample_images(self.sample_dir, 1)[0].read_bytes()

    @cached_property
    def plain(self):
        return self.make(self.bundle, max_batch=2)

    @cached_property
    def small(self):  # images over 100 kB and fields over 64 bytes refused; a stalled body after STALL s
        return self.make(self.bundle, max_upload_bytes=100_000, max_metadata_bytes=64, body_timeout_s=STALL)

    @cached_property
    def one_at_a_time(self):
        return self.make(self.bundle, max_inflight_requests=1)

    @cached_property
    def keyed(self):
        return self.make(self.bundle, api_key="k3y-for-tests")

    @cached_property
    def unstarted(self):  # lifespan never run: no bundle loaded
        from fastapi.testclient import TestClient

        from service.api.app import create_app
        from service.api.settings import Settings

        return TestClient(create_app(Settings(bundle=self.bundle)))

    @cached_property
    def no_heatmaps(self):
        """The bundle with a manifest whose CNN graph has no class activation map output (the
        manifest is not hashed; the graph may have more outputs than the manifest names)."""
        copy = self.tmp.mktemp("no-cam") / "bundle"
        shutil.copytree(self.bundle, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        for cnn in manifest["cnns"]:
            cnn["explain_outputs"] = [o for o in cnn["explain_outputs"] if o != "cam"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return self.make(copy)


@pytest.fixture(scope="module")
def apps(app_factory, tiny_run, tmp_path_factory, sample_dir) -> Apps:
    return Apps(app_factory, tiny_run, tmp_path_factory, sample_dir)


def post(client, path: str = "/predict", **kwargs) -> Answer:
    return answered(client.post(path, **kwargs))


def form_in_charset(app: Apps, charset: str) -> Answer:
    """/predict with an image, its form declaring `charset`."""
    return post(
        app.plain,
        content=PART + app.jpeg + b"\r\n--b--\r\n",
        headers={"Content-Type": f"multipart/form-data; boundary=b; charset={charset}"},
    )


def tiff() -> bytes:
    return encode(Image.new("RGB", (64, 64)), "TIFF")


NOISE = png(200, 200, noise=True)  # about 120 kB: over `small`'s image limit, its body under the request limit

# (case, request, status, code, words the detail must hold)
CASES = [
    ("not-ready", lambda a: post(a.unstarted, files={"image": a.jpeg}), 503, "not-ready", "still loading"),
    ("not-ready-probe", lambda a: answered(a.unstarted.get("/health/ready")), 503, "not-ready", "still loading"),
    ("unauthorized", lambda a: post(a.keyed, files={"image": a.jpeg}), 401, "unauthorized", "X-API-Key"),
    (
        "unauthorized-wrong-key",
        lambda a: post(a.keyed, files={"image": a.jpeg}, headers={"X-API-Key": "k3y-for-test"}),
        401,
        "unauthorized",
        "X-API-Key",
    ),
    ("body-too-large", lambda a: post(a.small, content=b"x" * 300_000), 413, "body-too-large", "byte limit"),
    (
        "body-too-large-chunked",  # no length declared: counted as the bytes arrive
        lambda a: post(
            a.small,
            content=iter([PART + b"x" * 300_000]),
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        413,
        "body-too-large",
        "byte limit",
    ),
    ("body-timeout", lambda a: stalled_body(a.small), 408, "body-timeout", f"stalled for over {STALL:g} s"),
    ("busy", lambda a: busy(a.one_at_a_time), 503, "busy", "busy"),
    (
        "explain-unavailable",
        lambda a: post(a.no_heatmaps, files={"image": a.jpeg}, data={"explain": "true"}),
        422,
        "explain-unavailable",
        "no heatmap output",
    ),
    (
        "image-too-large-bytes",
        lambda a: post(a.small, files={"image": ("n.png", NOISE, "image/png")}),
        413,
        "image-too-large",
        "over the 100000 byte limit",
    ),
    (
        "image-too-large-pixels",
        lambda a: post(a.plain, files={"image": ("bomb.png", png(2000, 1500), "image/png")}),
        413,
        "image-too-large",
        f"over the limit of {MAX_PIXELS}",
    ),
    (
        "image-shape-small",
        lambda a: post(a.plain, files={"image": ("s.png", png(20, 100), "image/png")}),
        422,
        "image-shape",
        "at least 32 pixels",
    ),
    (
        "image-shape-aspect",
        lambda a: post(a.plain, files={"image": ("w.png", png(500, 100), "image/png")}),
        422,
        "image-shape",
        "at most 4x the shorter",
    ),
    (
        "field-too-large",
        lambda a: post(a.small, files={"image": a.jpeg[:1000]}, data={"metadata": '{"age": 50}'.ljust(65)}),
        413,
        "field-too-large",
        "metadata field is over the 64 byte limit",
    ),
    (
        "triage-point-invalid",
        lambda a: post(a.plain, files={"image": a.jpeg}, data={"triage_point": "no-such-point"}),
        422,
        "triage-point-invalid",
        "'no-such-point' is not one of this bundle's",
    ),
    (
        "prior-invalid",
        lambda a: post(a.plain, files={"image": a.jpeg}, data={"prior": "uniform"}),
        422,
        "prior-invalid",
        "prior",
    ),
    (
        "metadata-invalid",
        lambda a: post(a.plain, files={"image": a.jpeg}, data={"metadata": '{"sex": "robot"}'}),
        422,
        "metadata-invalid",
        "robot",
    ),
    (
        "lesion-ids-invalid",
        lambda a: post(
            a.plain,
            "/predict/batch",
            files=[("images", a.jpeg), ("images", a.jpeg)],
            data={"lesion_ids": '["L1"]'},
        ),
        422,
        "lesion-ids-invalid",
        "one lesion id per image (2 images)",
    ),
    (
        "image-unsupported",
        lambda a: post(a.plain, files={"image": ("t.tif", tiff(), "image/tiff")}),
        415,
        "image-unsupported",
        "unsupported image format TIFF",
    ),
    (
        "image-invalid",
        lambda a: post(a.plain, files={"image": ("x.png", b"junk", "image/png")}),
        400,
        "image-invalid",
        "not a readable image",
    ),
    ("request-invalid", lambda a: post(a.plain, data={"prior": "balanced"}), 422, "request-invalid", "'image'"),
    (
        "request-invalid-too-many-files",
        lambda a: post(a.plain, "/predict/batch", files=[("images", a.jpeg)] * 3),
        400,
        "request-invalid",
        "Too many files",
    ),
    (
        "request-invalid-field-not-utf8",  # Starlette alone reads it as Latin-1: {"sex": "mÃ¢le"}
        lambda a: post(a.plain, files={"image": a.jpeg}, data={"metadata": '{"sex": "m\xe2le"}'.encode("latin-1")}),
        400,
        "request-invalid",
        "the metadata field is not utf-8 text",
    ),
    (
        "request-invalid-unknown-charset",  # Starlette alone falls back to Latin-1
        lambda a: form_in_charset(a, "bogus"),
        400,
        "request-invalid",
        "the form's charset is unknown: send UTF-8",
    ),
    (
        "request-invalid-utf16-form",  # decoded as UTF-16, every field name was garbled and the metadata unread
        lambda a: form_in_charset(a, "utf-16"),
        400,
        "request-invalid",
        "the form's charset is utf-16: send UTF-8",
    ),
]


@pytest.mark.parametrize("request_of,status,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_documented_problem_code_has_its_whole_body(apps, request_of, status, code, words):
    r = request_of(apps)
    assert r.status == status, (code, r.status, r.body[:500])
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = json.loads(r.body)
    assert set(body) == {"type", "title", "status", "code", "detail", "request_id"}, body
    assert body["status"] == status and body["code"] == code and body["type"] == TYPE + code, body
    assert words in body["detail"], body
    assert body["request_id"] and body["request_id"] == r.headers["x-request-id"], (body, r.headers)
    if code == "busy":
        assert r.headers["retry-after"] == "1", r.headers


def documented_codes(api) -> dict[str, set[str]]:
    """Route -> the problem codes its OpenAPI responses name ("problem codes: a, b (why), c")."""
    found: dict[str, set[str]] = {}
    paths = api.get("/openapi.json").json()["paths"]
    for route, method in (("/predict", "post"), ("/predict/batch", "post"), ("/health/ready", "get")):
        for response in paths[route][method]["responses"].values():
            text = response["description"]
            if text.startswith("problem codes: "):
                text = re.sub(r"\([^)]*\)", "", text.removeprefix("problem codes: "))
                found.setdefault(route, set()).update(c.strip() for c in text.split(","))
    return found


def test_the_cases_cover_every_documented_code(apps):
    documented = documented_codes(apps.plain)
    assert documented["/predict"] >= {"busy", "body-timeout", "image-shape", "explain-unavailable"}  # parsed
    assert documented["/health/ready"] == {"not-ready"}
    asserted = {code for _, _, _, code, _ in CASES}
    missing = set().union(*documented.values()) - asserted
    assert not missing, f"documented problem codes no case here produces: {sorted(missing)}"
