"""A bundle trained on synthetic demo data says so everywhere a user looks; a real one does not."""

from __future__ import annotations

import json

import pytest

from service.core.bundle import read_manifest
from service.core.labels import CLASSES
from tests.helpers import png

pytestmark = pytest.mark.scenario


def predict(client) -> dict:
    r = client.post("/predict", files={"image": ("x.png", png(64, 48, noise=True))}, data={"metadata": "{}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_demo_bundle_says_it_is_a_demo(demo_run, app_factory):
    manifest = read_manifest(demo_run / "bundle")
    assert manifest.synthetic_data and manifest.bundle_id.startswith("demo-synthetic-resnet18-")
    assert json.loads((demo_run / "artifacts" / "report.json").read_text())["data"]["synthetic"] is True
    client = app_factory(demo_run / "bundle")
    info = client.get("/model").json()
    assert info["synthetic_data"] and info["notice"].startswith("DEMO MODEL")
    answer = predict(client)
    assert answer["label"] in CLASSES and answer["model"]["synthetic_data"]
    assert answer["notice"].startswith("DEMO MODEL") and "Research use only" in answer["notice"]
    batch = client.post("/predict/batch", files=[("images", ("a.png", png(64, 48, noise=True)))]).json()
    assert batch["notice"].startswith("DEMO MODEL")


def test_a_real_bundle_has_no_demo_notice(tiny_run, api):
    manifest = read_manifest(tiny_run / "bundle")
    assert not manifest.synthetic_data and manifest.bundle_id.startswith("ham-resnet18-")
    assert not api.get("/model").json()["synthetic_data"]
    answer = predict(api)
    assert not answer["model"]["synthetic_data"] and "DEMO" not in answer["notice"]
