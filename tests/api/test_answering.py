"""The answering layer: routes -> service/api/answering.py -> the core, each domain number read once
(service/core/answers.py), and every route carrying the core's answer unchanged."""

from __future__ import annotations

import ast
import json
import math
import re

import numpy as np
import pytest

from service.core.answers import answer, malignant_probability, top_label
from service.core.preprocess import load_for_model
from tests.helpers import REPO, sample_images

API = REPO / "service" / "api"


def imported_modules(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_routers_import_layers_never_each_other():
    routers = sorted((API / "routes").glob("*.py"))
    assert len(routers) >= 4
    for path in routers:
        for name in imported_modules(path):
            assert not name.startswith("service.api.routes"), f"{path.name} imports {name}"
    for path in API.glob("*.py"):  # nor does a layer below import a router
        assert not any(n.startswith("service.api.routes") for n in imported_modules(path)) or path.name == "app.py"


def test_the_api_computes_no_domain_number():
    """The top-1 label, the malignant sum and the OOD flag are read in the core, never in the API."""
    for path in sorted(API.rglob("*.py")):
        text = path.read_text()
        for words in ("argmax", ".flagged_by(", "malignant_classes.index", "classes.index(c) for c in"):
            assert words not in text, f"{path.relative_to(REPO)} computes a domain number: {words}"


def test_an_answer_reads_the_moved_probabilities_and_the_unmoved_scores(predictor):
    m = predictor.manifest
    assert m.ood is not None and m.ood.image_threshold is not None
    image = np.full((1, m.preprocessing.height, m.preprocessing.width, 3), 90, np.uint8)
    (pred,) = predictor.predict(image, [None])
    pred.ood_score, pred.image_ood_score = m.ood.threshold + 1, m.ood.image_threshold - 1  # the CNN's flag only
    prevalence = {c: (0.9 if c == "vasc" else 0.1 / (len(m.classes) - 1)) for c in m.classes}
    adjust = predictor.prior(prevalence)
    got = answer(m, pred, "custom", adjust, ["blurred"])
    moved = pred.under_prior(*adjust).probabilities
    assert np.array_equal(got.probabilities, moved) and got.prior == "custom"
    assert got.label == m.classes[int(np.argmax(moved))] != m.classes[int(np.argmax(pred.probabilities))]
    idx = [m.classes.index(c) for c in m.malignant_classes]
    assert got.malignant_probability == pytest.approx(moved[idx].sum(), abs=1e-12)
    assert got.ood is not None and got.ood.flagged_by == [m.ood.method] and got.ood_flagged
    assert got.warnings[0] == "blurred" and got.warnings[1].startswith("out of distribution: ")
    assert "to the CNN" in got.warnings[1] and "colour and texture" not in got.warnings[1]
    pred.ood_score = m.ood.threshold - 1
    calm = answer(m, pred, "balanced", None)
    assert calm.ood is not None and not calm.ood_flagged and calm.warnings == []
    assert calm.label == top_label(m, pred.probabilities)
    assert calm.malignant_probability == malignant_probability(m, pred.probabilities)


def test_every_route_carries_the_cores_answer(api, predictor, sample_dir):
    """/predict, /predict/batch and /v2 give for each image what the core's `answer` gives for the
    predictor's own prediction, under the same prior."""
    m = predictor.manifest
    paths = sample_images(sample_dir, 3)
    prior = {c: 1 / len(m.classes) + (0.02 if c == "mel" else -0.02 / (len(m.classes) - 1)) for c in m.classes}
    meta = {"age": 55, "sex": "female", "site": "back"}
    images = np.stack([load_for_model(p.read_bytes(), m.preprocessing) for p in paths])
    preds = predictor.predict(images, [meta] * len(paths))
    core = [answer(m, p, "custom", predictor.prior(prior)) for p in preds]

    form = {"metadata": json.dumps(meta), "prior": json.dumps(prior)}
    single = [api.post("/predict", files={"image": p.read_bytes()}, data=form).json() for p in paths]
    batch = api.post(
        "/predict/batch",
        files=[("images", (p.name, p.read_bytes())) for p in paths],
        data={"metadata": json.dumps([meta] * len(paths)), "prior": json.dumps(prior)},
    ).json()["predictions"]
    import base64

    v2 = api.post(
        "/v2/models/lesion/infer",
        json={
            "parameters": {"prior": prior},
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(paths)],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(p.read_bytes()).decode() for p in paths],
                },
                {
                    "name": "metadata",
                    "shape": [len(paths)],
                    "datatype": "BYTES",
                    "data": [json.dumps(meta)] * len(paths),
                },
            ],
        },
    ).json()
    out = {o["name"]: o["data"] for o in v2["outputs"]}
    for i, want in enumerate(core):
        for got in (single[i], batch[i]):
            assert got["label"] == want.label and got["prior"] == "custom"
            assert got["malignant_probability"] == pytest.approx(want.malignant_probability, abs=1e-9)
            assert got["warnings"] == want.warnings
            assert got["ood"]["flagged"] == want.ood_flagged and got["ood"]["score"] == pytest.approx(want.ood.score)
        assert out["label"][i] == want.label and out["ood_flagged"][i] == want.ood_flagged
        assert out["malignant_probability"][i] == pytest.approx(want.malignant_probability, abs=1e-6)
        assert json.loads(out["warnings"][i]) == want.warnings
        assert not math.isnan(out["ood_score"][i])


def test_triage_decides_on_the_score_as_trained_and_never_routines_a_warned_image(predictor):
    m = predictor.manifest
    assert m.triage is not None and m.triage.default == "sensitivity-0.95"
    image = np.full((1, m.preprocessing.height, m.preprocessing.width, 3), 90, np.uint8)
    (pred,) = predictor.predict(image, [None])
    pred.ood_score, pred.image_ood_score = m.ood.threshold - 1, m.ood.image_threshold - 1  # not flagged
    as_trained = malignant_probability(m, pred.probabilities)
    benign = {c: (0.01 if c in m.malignant_classes else 0.97 / (len(m.classes) - 3)) for c in m.classes}
    for point in m.triage.points:
        got = answer(m, pred, "custom", predictor.prior(benign), (), point.name)
        assert got.malignant_probability < as_trained  # the prior moved the answer shown...
        assert got.triage is not None and got.triage.score == as_trained  # ...not the score triaged
        assert got.triage.point == point
        assert got.triage.decision == ("refer" if as_trained >= point.threshold else "routine")
    assert answer(m, pred, "balanced", None).triage.point.name == "sensitivity-0.95"  # the default
    for cause in ("quality", "ood"):
        pred.ood_score = m.ood.threshold + (1 if cause == "ood" else -1)
        warned = answer(m, pred, "balanced", None, ["too dark"] if cause == "quality" else [])
        assert warned.triage.decision == "not-triaged" and warned.triage.reason.startswith("cannot be triaged: ")
        assert warned.warnings[0] in warned.triage.reason


def test_every_route_carries_the_cores_triage_and_refuses_an_unknown_point(api, predictor, sample_dir):
    import base64

    m = predictor.manifest
    names = m.triage.names
    paths = sample_images(sample_dir, 3)
    images = np.stack([load_for_model(p.read_bytes(), m.preprocessing) for p in paths])
    preds = predictor.predict(images, [None] * len(paths))
    before = api.get("/metrics").text
    for point in names:
        core = [answer(m, p, "balanced", None, point=point) for p in preds]
        files = [("images", (p.name, p.read_bytes())) for p in paths]
        batch = api.post("/predict/batch", files=files, data={"triage_point": point}).json()["predictions"]
        single = [
            api.post("/predict", files={"image": p.read_bytes()}, data={"triage_point": point}).json() for p in paths
        ]
        v2 = api.post(
            "/v2/models/lesion/infer",
            json={
                "parameters": {"triage_point": point},
                "inputs": [
                    {
                        "name": "image",
                        "shape": [len(paths)],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(p.read_bytes()).decode() for p in paths],
                    }
                ],
                "outputs": [{"name": "triage"}],
            },
        ).json()
        (out,) = v2["outputs"]
        for i, want in enumerate(core):
            for got in (single[i]["triage"], batch[i]["triage"], json.loads(out["data"][i])):
                assert got["decision"] == want.triage.decision and got["point"] == point
                assert got["threshold"] == want.triage.point.threshold and got["reason"] == want.triage.reason
                assert got["score"] == pytest.approx(want.triage.score, abs=1e-12)
    after = api.get("/metrics").text
    counted = lambda text: sum(float(v) for v in re.findall(r"lesion_triage_total\{[^}]*\} (\S+)", text))  # noqa: E731
    assert counted(after) - counted(before) == 3 * len(names) * len(paths)
    assert f'point="{m.triage.default}"' in after and "lesion_triage_expected_referral_share{" in after

    image = paths[0].read_bytes()
    for route, files in (("/predict", {"image": image}), ("/predict/batch", [("images", ("a.jpg", image))])):
        r = api.post(route, files=files, data={"triage_point": "sensitivity-0.5"})
        assert r.status_code == 422 and r.json()["code"] == "triage-point-invalid", r.text
        assert all(n in r.json()["detail"] for n in names)
    body = {
        "parameters": {"triage_point": "sensitivity-0.5"},
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}],
    }
    r = api.post("/v2/models/lesion/infer", json=body)
    assert r.status_code == 400 and all(n in r.json()["error"] for n in names)
    info = api.get("/model").json()["triage"]
    assert [p["name"] for p in info["points"]] == names and info["default"] == m.triage.default


def test_a_lesion_is_triaged_at_its_lesion_point_on_its_images_as_trained(api, predictor, sample_dir):
    from service.core.answers import lesion_verdict

    m = predictor.manifest
    assert [p.name for p in m.triage.lesion_points] == m.triage.names
    paths = sample_images(sample_dir, 3)
    images = np.stack([load_for_model(p.read_bytes(), m.preprocessing) for p in paths])
    preds = predictor.predict(images, [None] * len(paths))
    prior = json.dumps({c: (0.5 if c == "nv" else 0.5 / (len(m.classes) - 1)) for c in m.classes})
    point = m.triage.names[0]
    core = lesion_verdict(
        m, [answer(m, p, "custom", predictor.prior(json.loads(prior)), point=point) for p in preds], point
    )
    r = api.post(
        "/predict/batch",
        files=[("images", (p.name, p.read_bytes())) for p in paths],
        data={"lesion_ids": json.dumps(["L1"] * len(paths)), "prior": prior, "triage_point": point},
    ).json()
    (lesion,) = r["lesions"]
    trained = lesion_verdict(m, [answer(m, p, "balanced", None) for p in preds]).malignant_probability
    assert lesion["triage"]["score"] == pytest.approx(trained, abs=1e-12) == pytest.approx(core.triage.score)
    assert lesion["triage"]["threshold"] == m.triage.point(point, lesion=True).threshold
    assert lesion["triage"]["decision"] == core.triage.decision and lesion["triage"]["point"] == point
    assert lesion["malignant_probability"] == pytest.approx(core.malignant_probability, abs=1e-9)
