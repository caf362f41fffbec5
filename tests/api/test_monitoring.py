"""Model monitoring: the answers counted per bundle and class, the OOD and quality counts, and the
drift gauges against the bundle's out-of-fold baseline (service/api/monitoring.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service.api.monitoring import DriftWindow, psi
from service.core.manifest import MonitoringReference
from tests.helpers import metric_total, sample_images, variants


def gauge(text: str, signal: str) -> float | None:
    found = re.findall(rf'lesion_drift_psi\{{bundle_id="[^"]+",signal="{signal}"\}} (\S+)', text)
    return float(found[0]) if found else None


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    e = np.full(7, 1 / 7)
    assert psi(e, e) == 0
    small, large = np.array([0.2, 0.1, 0.1, 0.1, 0.2, 0.2, 0.1]), np.eye(7)[0]
    assert 0 < psi(small, e) < 0.25 < psi(large, e)
    # by hand: (a - e) ln(a / e) summed; for two bins 0.5/0.5 -> 0.7/0.3: 0.2 ln(1.4) + (-0.2) ln(0.6)
    assert psi(np.array([0.7, 0.3]), np.array([0.5, 0.5])) == pytest.approx(0.2 * np.log(1.4) - 0.2 * np.log(0.6))
    # asymmetric shares tell the PSI from KL divergence (sum a ln(a/e) = 0.0823 here, the PSI 0.1695)
    assert psi(np.array([0.7, 0.3]), np.array([0.5, 0.5])) != pytest.approx(0.7 * np.log(1.4) + 0.3 * np.log(0.6))


def test_the_window_keeps_the_last_answers_and_waits_for_enough(tiny_run):
    from service.core.bundle import read_manifest

    manifest = read_manifest(tiny_run / "bundle")
    assert isinstance(manifest.monitoring, MonitoringReference)
    assert sum(manifest.monitoring.label_shares.values()) == pytest.approx(1)
    assert len(manifest.monitoring.ood_score_edges) == 9
    window = DriftWindow(manifest, size=20)
    for _ in range(19):
        window.add(0, 1.0)
    assert window.label_psi() is None  # too few answers to say anything
    window.add(0, 1.0)
    skewed = window.label_psi()
    assert skewed is not None and skewed > 0.25
    shares = manifest.monitoring.label_shares
    for label in np.random.default_rng(0).choice(7, 20, p=[shares[c] for c in manifest.classes]):
        window.add(int(label), None)
    matched = window.label_psi()
    assert matched is not None and matched < skewed  # the skewed answers left the window


def test_a_skewed_stream_moves_the_drift_gauges(app_factory, tiny_run, sample_dir):
    client = app_factory(tiny_run / "bundle", drift_window=40)
    varied = [p.read_bytes() for p in sorted((sample_dir / "images").iterdir())[::50][:40]]
    for data in varied:
        assert client.post("/predict", files={"image": data}).status_code == 200
    text = client.get("/metrics").text
    before = gauge(text, "label"), gauge(text, "ood_score")
    assert None not in before
    answers = metric_total(text, "lesion_answers_total")
    assert answers == 40 and 'lesion_malignant_probability_count{bundle_id="' in text
    share = client.get("/model").json()["ood"]["flag_share"]
    assert re.search(rf'lesion_ood_design_share\{{bundle_id="[^"]+"\}} {share}', text), text
    for _ in range(40):  # an image already in the window, again and again: counted, but not as drift
        assert client.post("/predict", files={"image": varied[0]}).status_code == 200
    text = client.get("/metrics").text
    assert (gauge(text, "label"), gauge(text, "ood_score")) == before
    assert metric_total(text, "lesion_answers_total") == 80
    for variant in variants(sample_images(sample_dir, 1)[0], 40):  # one image, altered: one class, one OOD bin
        assert client.post("/predict", files={"image": variant}).status_code == 200
    text = client.get("/metrics").text
    after = gauge(text, "label"), gauge(text, "ood_score")
    assert after[0] > max(before[0], 0.25) and after[1] > max(before[1], 0.25), (before, after)


def test_an_image_counts_once_while_it_is_in_the_window(tiny_run):
    from service.core.bundle import read_manifest

    window = DriftWindow(read_manifest(tiny_run / "bundle"), size=3)
    assert window.add(0, 1.0, b"a") and not window.add(0, 1.0, b"a")  # a resend moves nothing
    assert window.add(1, 1.0, b"b") and window.add(2, 1.0, b"c") and list(window.labels) == [0, 1, 2]
    assert window.add(3, 1.0, b"d") and list(window.labels) == [1, 2, 3]  # "a" left the window
    assert window.add(0, 1.0, b"a") and not window.add(0, 1.0, b"d")  # "a" counts again, "d" still held


def test_flagged_and_warned_answers_are_counted(app_factory, tiny_run):
    from tests.helpers import png

    client = app_factory(tiny_run / "bundle")
    before = client.get("/metrics").text
    answers = []
    for image in (
        png(300, 225),
        png(300, 225, noise=True),
        png(300, 225, noise=True),
    ):  # black: warned; noise: unlike skin
        r = client.post("/predict", files={"image": ("x.png", image, "image/png")})
        assert r.status_code == 200
        answers.append(r.json())
    text = client.get("/metrics").text

    def count(name: str, page: str) -> float:
        return sum(float(v) for v in re.findall(rf"{name}\{{[^}}]*\}} (\S+)", page))

    warned, flagged = sum(bool(a["warnings"]) for a in answers), sum(a["ood"]["flagged"] for a in answers)
    assert warned >= 1 and flagged >= 1  # the counts below are of something
    assert count("lesion_quality_warned_total", text) - count("lesion_quality_warned_total", before) == sum(
        any(not w.startswith("out of distribution") for w in a["warnings"]) for a in answers
    )
    assert count("lesion_ood_flagged_total", text) - count("lesion_ood_flagged_total", before) == flagged


def test_a_bundle_no_longer_served_has_no_drift(predictor, sample_dir):
    """After a swap the old bundle's gauges read NaN, which no alert compares above a threshold."""
    from service.api.metrics import Metrics
    from service.core.preprocess import load_for_model

    m = Metrics(drift_window=10)
    spec = predictor.manifest.preprocessing
    images = np.stack([load_for_model(p.read_bytes(), spec) for p in sorted((sample_dir / "images").iterdir())[:10]])
    preds = predictor.predict(images, [None] * 10)
    m.observe_answers(predictor.manifest, preds, [[]] * 10)
    bundle = predictor.manifest.bundle_id
    assert not np.isnan(m.drift.labels(bundle, "label")._value.get())
    m.serving("another-bundle", bundle)
    assert np.isnan(m.drift.labels(bundle, "label")._value.get()) and bundle not in m.windows


def test_static_routes_have_their_own_labels(api):
    from service.api.routes.operations import SWAGGER_UI

    asset = sorted(p.name for p in SWAGGER_UI.iterdir() if p.suffix == ".css")[0]
    assert api.get("/openapi.json").status_code == 200 and api.get(f"/docs-assets/{asset}").status_code == 200
    api.get("/no-such-page")
    text = api.get("/metrics").text
    assert 'lesion_http_requests_total{route="/openapi.json",status="200"}' in text
    assert 'lesion_http_requests_total{route="/docs-assets/{path}",status="200"}' in text
    assert 'lesion_http_requests_total{route="unmatched",status="404"}' in text


def test_the_baseline_is_the_served_graphs_out_of_fold_answers(tiny_run):
    """The drift baseline: the top-1 shares of the served answer out-of-fold through the fold graphs at
    the precision served, and the deciles of the held-out OOD score (the baseline stage's tables)."""
    import pandas as pd

    from service.core.bundle import read_manifest

    manifest = read_manifest(tiny_run / "bundle")
    served = pd.read_csv(tiny_run / "artifacts" / "oof_served_graphs.csv")
    top1 = served.filter(like="p_").to_numpy().argmax(1)
    expected = {c: float(np.mean(top1 == i)) for i, c in enumerate(manifest.classes)}
    assert manifest.monitoring is not None and manifest.monitoring.label_shares == pytest.approx(expected)
    assert manifest.ood is not None
    held = pd.read_csv(tiny_run / "artifacts" / "oof_ood.csv")[manifest.ood.method].to_numpy()
    assert manifest.monitoring.ood_score_edges == pytest.approx(np.quantile(held, np.arange(1, 10) / 10).tolist())
