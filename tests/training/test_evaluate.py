"""External validation: `python -m training evaluate` scores a bundle on labelled data, naming overlap."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from service.core.labels import CLASSES
from service.core.predictor import Predictor
from service.core.preprocess import load_for_model
from tests.helpers import REPO
from training.data.io import PROB_COLUMNS
from training.evaluate import evaluate_bundle
from training.evaluation.metrics import all_metrics

pytestmark = pytest.mark.scenario


def quiet(msg: str) -> None:
    pass


def test_evaluate_scores_unseen_images_and_leaves_training_lesions_out(tiny_run, tiny_data, subset, tmp_path):
    data = subset(8, name="external")  # 8 per class of the sample: some are the tiny bundle's training lesions
    cmd = [sys.executable, "-m", "training", "evaluate", "--bundle", str(tiny_run / "bundle")]
    cmd += ["--data-dir", str(data), "--out", str(tmp_path / "eval"), "--bootstrap", "20"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    trained = pd.read_csv(tiny_data / "HAM10000_metadata.csv")
    table = pd.read_csv(data / "HAM10000_metadata.csv")
    seen = table.image_id.isin(trained.image_id) | table.lesion_id.isin(trained.lesion_id)
    assert seen.any() and report["overlap"]["images"] == int(seen.sum()) and not report["overlap"]["included"]
    assert "left out of the figures" in (tmp_path / "eval" / "report.md").read_text()
    assert "warning:" in out.stdout + out.stderr

    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert set(preds.image_id) == set(table.image_id[~seen]) and report["data"]["images"] == len(preds)
    assert list(preds.columns[:3]) == ["image_id", "lesion_id", "dx"]
    y = preds.dx.map(CLASSES.index).to_numpy()
    served = report["served"]
    assert np.isclose(report["models"][served]["bmca"]["value"], all_metrics(y, preds[PROB_COLUMNS].to_numpy())["bmca"])
    rule = Predictor.load(tiny_run / "bundle").manifest.lesion_rule
    lesion_cols = [f"lesion_{c}" for c in PROB_COLUMNS]
    for _, group in preds.groupby("lesion_id"):  # every row carries its lesion's answer, by the bundle's rule
        p = group[PROB_COLUMNS].to_numpy()
        want = p.mean(0) if rule == "mean" else np.exp(np.log(p).mean(0))
        np.testing.assert_allclose(
            group[lesion_cols].to_numpy(), np.tile(want / want.sum(), (len(group), 1)), atol=1e-6
        )
    level = report["lesion_level"]
    assert level["rule"] == rule and level["lesions"] == preds.lesion_id.nunique() and served in level["models"]
    assert "Per lesion" in (tmp_path / "eval" / "report.md").read_text()
    triage = Predictor.load(tiny_run / "bundle").manifest.triage  # each point's threshold on this data
    malignant = preds.dx.isin(["akiec", "bcc", "mel"]).to_numpy()
    scores = preds[[f"p_{c}" for c in ("akiec", "bcc", "mel")]].to_numpy().sum(1)
    for point, row in zip(triage.points, report["triage"]["images"]):
        refer = scores >= point.threshold
        assert row["point"] == point.name and row["sensitivity"]["promised"] == point.sensitivity.value
        assert np.isclose(row["sensitivity"]["value"], refer[malignant].mean())
        assert np.isclose(row["specificity"]["value"], (~refer[~malignant]).mean())
        assert row["holds"] == (row["sensitivity"]["ci95"][1] >= point.sensitivity.value) & (
            row["specificity"]["ci95"][1] >= point.specificity.value
        )
    assert [r["point"] for r in report["triage"]["lesions"]] == triage.names
    assert "Triage operating points on these images" in (tmp_path / "eval" / "report.md").read_text()
    for plot in ("roc_served.png", "confusion_served.png", "reliability.png"):
        assert (tmp_path / "eval" / "plots" / plot).stat().st_size > 1000

    # the served answers are the service's own: same probabilities as the Predictor on the same files
    predictor = Predictor.load(tiny_run / "bundle")
    row = table[~seen].iloc[0]
    image = load_for_model(
        next((data / "images").glob(f"{row.image_id}.*")).read_bytes(), predictor.manifest.preprocessing
    )
    meta = {"age": None if np.isnan(row.age) else row.age, "sex": row.sex, "site": row.localization}
    (expected,) = predictor.predict(image[None], [meta])
    got = preds.set_index("image_id").loc[row.image_id, PROB_COLUMNS].to_numpy(float)
    assert np.allclose(got, expected.probabilities, atol=1e-6)


def test_evaluate_on_the_training_data_itself_needs_include_overlap(tiny_run, tiny_data, tmp_path):
    from training.errors import DataError

    with pytest.raises(DataError, match="every image overlaps"):
        evaluate_bundle(tiny_run / "bundle", tiny_data, tmp_path / "a", bootstrap=5, log=quiet)
    report = evaluate_bundle(
        tiny_run / "bundle", tiny_data, tmp_path / "b", bootstrap=5, include_overlap=True, log=quiet
    )
    assert report["overlap"]["included"] and report["data"]["images"] == report["overlap"]["images"]


def test_a_bundle_without_its_training_list_says_overlap_is_unknown(tiny_run, tiny_data, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = manifest.pop("training_images")
    del manifest["files"][name]
    (bundle / name).unlink()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = evaluate_bundle(bundle, tiny_data, tmp_path / "eval", bootstrap=5, log=quiet)
    assert not report["overlap"]["checked"] and report["data"]["images"] > 0
    assert "overlap with them is unknown" in (tmp_path / "eval" / "report.md").read_text()


def test_evaluate_needs_malignant_and_benign_lesions(tiny_run, subset, tmp_path):
    from training.errors import DataError

    data = subset(3, name="benign-only")
    table = pd.read_csv(data / "HAM10000_metadata.csv")
    table[table.dx == "nv"].to_csv(data / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match="all benign"):
        evaluate_bundle(tiny_run / "bundle", data, tmp_path / "eval", bootstrap=5, include_overlap=True, log=quiet)
