"""The answering layer: routes -> service/api/answering.py -> the core, each domain number read once
(service/core/answers.py), and every route carrying the core's answer unchanged."""

from __future__ import annotations

import ast
import json
import math

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
