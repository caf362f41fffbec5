"""/predict/batch with lesion_ids: one answer per lesion, combined by the bundle's rule from its
images' answers as returned, with every image's flags and warnings kept."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests.helpers import png, sample_images


def probs_of(entry: dict, classes: list[str]) -> np.ndarray:
    return np.array([entry["probabilities"][c] for c in classes])


def with_rule(bundle, rule: str, tmp_path):
    """A copy of the bundle whose manifest names another lesion rule (the manifest is not hashed)."""
    copy = tmp_path / f"bundle-{rule}"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["lesion_rule"], manifest["lesion_rule_choice"] = rule, None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("rule", ["mean", "log_mean"])
def test_lesions_combine_their_images_by_the_bundles_rule(app_factory, tiny_run, sample_dir, tmp_path, rule):
    api = app_factory(with_rule(tiny_run / "bundle", rule, tmp_path))
    classes = api.get("/model").json()["classes"]
    assert api.get("/model").json()["lesion_rule"] == rule
    paths = sample_images(sample_dir, 4)
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    ids = ["L-a", "L-b", "L-a", None]
    r = api.post("/predict/batch", files=files, data={"lesion_ids": json.dumps(ids), "prior": "training"})
    assert r.status_code == 200, r.text
    body = r.json()
    images = [probs_of(p, classes) for p in body["predictions"]]
    a, b = body["lesions"]
    assert (a["lesion_id"], a["images"], b["lesion_id"], b["images"]) == ("L-a", [0, 2], "L-b", [1])
    if rule == "mean":
        want = (images[0] + images[2]) / 2
    else:
        g = np.sqrt(images[0] * images[2])
        want = g / g.sum()
    np.testing.assert_allclose(probs_of(a, classes), want, atol=1e-9)
    np.testing.assert_allclose(probs_of(b, classes), images[1], atol=1e-9)  # one image: its own answer
    assert a["combined_by"] == rule and a["prior"] == "training" and a["label"] == classes[int(np.argmax(want))]
    assert a["malignant_probability"] == pytest.approx(sum(a["probabilities"][c] for c in ("akiec", "bcc", "mel")))
    assert not a["unanswered"] and a["ood_flagged"] == [
        i for i in (0, 2) if body["predictions"][i]["ood"] and body["predictions"][i]["ood"]["flagged"]
    ]


def test_warnings_and_unreadable_images_reach_the_lesion(api, sample_dir):
    jpeg = sample_images(sample_dir, 1)[0].read_bytes()
    files = [
        ("images", ("good.jpg", jpeg, "image/jpeg")),
        ("images", ("small.png", png(40, 40), "image/png")),
        ("images", ("broken.jpg", b"not an image", "image/jpeg")),
        ("images", ("lost.jpg", b"neither", "image/jpeg")),
    ]
    ids = ["one", "one", "one", "two"]
    r = api.post("/predict/batch", files=files, data={"lesion_ids": json.dumps(ids)})
    assert r.status_code == 200, r.text
    one, two = r.json()["lesions"]
    assert one["images"] == [0, 1] and one["unanswered"] == [2]
    small_warnings = r.json()["predictions"][1]["warnings"]
    assert small_warnings and all(f"image 1 (small.png): {w}" in one["warnings"] for w in small_warnings)
    assert any("answered from 2 of its 3 images" in w for w in one["warnings"])
    assert two["lesion_id"] == "two" and two["unanswered"] == [3] and two["error"]["code"] == "lesion-unanswered"


@pytest.mark.parametrize(
    "value",
    [
        '["a"]',
        '["a", "b", "c"]',
        '{"a": 1}',
        '["a", 3]',
        '["", "b"]',
        json.dumps(["x" * 129, "b"]),
        "not json",
        '["\\ud800", "b"]',  # a lone surrogate: once an error after the model ran
        '["a\\u0000", "b"]',
        "[" * 5000 + "]" * 5000,  # nesting deeper than the parser recurses
        '["a", 1' + "0" * 5000 + "]",  # an integer of thousands of digits
    ],
)
def test_bad_lesion_ids_are_a_422(api, sample_dir, value):
    jpeg = sample_images(sample_dir, 1)[0].read_bytes()
    files = [("images", ("a.jpg", jpeg, "image/jpeg"))] * 2
    before = re.findall(r"lesion_images_predicted_total (\S+)", api.get("/metrics").text)
    r = api.post("/predict/batch", files=files, data={"lesion_ids": value})
    assert r.status_code == 422 and r.json()["code"] == "lesion-ids-invalid", r.text
    assert re.findall(r"lesion_images_predicted_total (\S+)", api.get("/metrics").text) == before  # no model work


def test_ids_spelled_alike_are_one_lesion_and_case_matters(api, sample_dir):
    """Canonically equivalent spellings (NFC: "é" composed or as "e" + accent) are one lesion; ids
    that differ in case are two (docs/api.md)."""
    jpeg = sample_images(sample_dir, 1)[0].read_bytes()
    files = [("images", ("a.jpg", jpeg, "image/jpeg"))] * 4
    ids = ["l\u00e9sion", "le\u0301sion", "L1", "l1"]
    r = api.post("/predict/batch", files=files, data={"lesion_ids": json.dumps(ids)})
    assert r.status_code == 200, r.text
    lesions = {one["lesion_id"]: one["images"] for one in r.json()["lesions"]}
    assert lesions == {"l\u00e9sion": [0, 1], "L1": [2], "l1": [3]}


def test_without_lesion_ids_there_is_no_lesion_answer(api, sample_dir):
    jpeg = sample_images(sample_dir, 1)[0].read_bytes()
    r = api.post("/predict/batch", files=[("images", ("a.jpg", jpeg, "image/jpeg"))])
    assert r.status_code == 200 and r.json()["lesions"] is None
