"""The multipart limits are each app's own: two apps with their own settings in one process each
refuse an image or a field over their own limit, accept what is under it, and spool each upload in
memory sized by their own limit (no setting of the last app made is the process's)."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import starlette.formparsers
from PIL import Image

from tests.hostile import encode


def test_two_apps_in_one_process_keep_their_own_part_limits_and_spools(app_factory, tiny_run, monkeypatch):
    small = app_factory(tiny_run / "bundle", max_upload_bytes=1_000_000, max_metadata_bytes=64)
    large = app_factory(tiny_run / "bundle", max_upload_bytes=2_500_000, max_metadata_bytes=4096)
    made_last = app_factory(tiny_run / "bundle", max_upload_bytes=900_000, max_metadata_bytes=32)  # changes nothing

    spools: list[int] = []

    class Spool(tempfile.SpooledTemporaryFile):  # the parser's file for each uploaded image
        def __init__(self, max_size: int = 0, *args, **kwargs):
            spools.append(max_size)
            super().__init__(max_size, *args, **kwargs)

        def rollover(self):
            raise AssertionError("an upload was written to disk")

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Spool)
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), np.uint8)), "PNG")
    assert 1_100_000 < len(png) < 2_500_000  # over small's limit (and Starlette's 1 MB spool), under large's
    meta = json.dumps([{"age": 55, "sex": "male", "site": "lower extremity"}]).ljust(100)  # 100 bytes
    image = [("images", ("a.png", png, "image/png"))]
    # /predict/batch: a body may hold many images, so each one's own limit is the parser's to keep
    for _ in range(2):  # interleaved: each request meets its own app's limits
        spools.clear()
        r = small.post("/predict/batch", files=image)
        assert r.status_code == 413 and r.json()["code"] == "image-too-large", r.text
        assert "over the 1000000 byte limit" in r.json()["detail"]
        assert spools == [1_000_000]
        r = small.post("/predict/batch", files=[("images", ("a.png", png[:1000]))], data={"metadata": meta})
        assert r.status_code == 413 and r.json()["code"] == "field-too-large", r.text
        assert "64 byte limit" in r.json()["detail"]

        spools.clear()
        r = large.post("/predict/batch", files=image, data={"metadata": meta})
        assert r.status_code == 200, r.text
        assert spools == [2_500_000]  # the whole image in memory, in a spool of large's own size

        r = made_last.post("/predict/batch", files=image)
        assert r.status_code == 413 and "over the 900000 byte limit" in r.json()["detail"], r.text
