"""The calibration lesions: held out of the served models' refit, so the triage points a bundle
promises are measured on what it serves for images it never saw (training/data/folds.py,
training/stages/triage.py)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.core.answers import malignant_probability
from service.core.bundle import read_manifest
from service.core.features import stack_inputs
from service.core.labels import MALIGNANT_CLASSES
from service.core.predictor import Predictor
from service.core.preprocess import load_for_model
from training.config import STACK, make_config, save_or_check, saved_config
from training.data.folds import ensure_folds, make_folds
from training.data.io import PROB_COLUMNS
from training.ensemble.stacking import make_meta_learner
from training.errors import ConfigMismatch, DataError
from training.evaluation.triage import decision_figures, nested_thresholds, threshold_for
from training.run import Run


def test_calibration_lesions_are_whole_stratified_and_about_the_share(sample_dir):
    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv")  # all 10,015 rows
    folds = make_folds(meta, 5, seed=42, calibration_share=0.2)
    assert folds.groupby("lesion_id").calibration.nunique().max() == 1  # never both sides of the split
    held = folds.calibration.to_numpy()
    assert abs(folds[held].lesion_id.nunique() / folds.lesion_id.nunique() - 0.2) < 0.02
    for dx, share in meta.dx.value_counts(normalize=True).items():  # dx-stratified, the rarest classes too
        assert abs((meta.dx[held] == dx).mean() / share - 1) < 0.15, dx
    assert set(folds.fold[held]) == set(range(5))  # every fold keeps its calibration rows (nested thresholds)
    assert (make_folds(meta, 5, 42).fold == folds.fold).all()  # the folds do not depend on the share
    assert not make_folds(meta, 5, 42, 0.0).calibration.any()
    other = make_folds(meta, 5, 43, 0.2).calibration.to_numpy()
    assert (other != held).any()  # seeded


def test_a_folds_file_from_before_the_calibration_share_resumes_only_without_one(sample_dir, tmp_path):
    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv").head(600)
    path = tmp_path / "folds.csv"
    make_folds(meta, 3, 0).drop(columns="calibration").to_csv(path, index=False)
    assert not ensure_folds(meta, path, 3, 0, 0.0, log=lambda m: None).calibration.any()
    with pytest.raises(ConfigMismatch, match="marks no calibration lesions"):
        ensure_folds(meta, path, 3, 0, 0.2, log=lambda m: None)


def test_too_few_malignant_calibration_images_are_refused_when_the_folds_are_made(sample_dir):
    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv")
    benign = meta[~meta.dx.isin(MALIGNANT_CLASSES)].head(300)
    few = pd.concat([benign, meta[meta.dx == "mel"].head(1)])  # one malignant image in all
    with pytest.raises(DataError, match="too few to choose triage thresholds outside each fold"):
        make_folds(few, 3, 0, 0.2)
    make_folds(few, 3, 0, 0.0)  # without calibration the out-of-fold points need no such rows here


def test_the_fold_ensemble_has_no_calibration_lesions_and_old_runs_had_none(tmp_path):
    with pytest.raises(ConfigMismatch, match="--calibration-share must be 0 with --served-cnn ensemble"):
        make_config("smoke", "d", served_cnn="ensemble", calibration_share=0.2)  # asked for: refused
    assert make_config("smoke", "d", served_cnn="ensemble").calibration_share == 0  # the default follows it
    assert make_config("smoke", "d").calibration_share == 0.2
    cfg = json.loads(make_config("smoke", "d").model_dump_json())
    del cfg["calibration_share"]  # a run started before the setting existed refit on every row
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert saved_config(tmp_path).calibration_share == 0
    with pytest.raises(
        ConfigMismatch, match=r"calibration_share: 0.0 -> 0.2\); resume it with --calibration-share 0.0"
    ):
        save_or_check(make_config("smoke", "d"), tmp_path)  # today's default: says how to resume
    save_or_check(make_config("smoke", "d", calibration_share=0), tmp_path)


def test_the_bundles_triage_points_are_its_own_answers_on_the_calibration_lesions(smoke_run):
    """What the manifest promises is recomputed here from the bundle alone: the Predictor's served
    answers for the calibration images, decoded as the service decodes an upload."""
    run = Run(saved_config(smoke_run), smoke_run, log=lambda m: None)
    manifest = read_manifest(smoke_run / "bundle")
    table = run.table[run.table.calibration]
    assert 0.15 < len(table) / len(run.table) < 0.25
    triage = manifest.triage
    assert triage is not None and triage.source == "calibration"
    assert (triage.images, triage.lesions) == (len(table), table.lesion_id.nunique())

    predictor = Predictor.load(smoke_run / "bundle")
    images = np.stack([load_for_model(Path(p).read_bytes(), manifest.preprocessing) for p in table.path])
    metadata = [
        {"age": a, "sex": s, "localization": site} for a, s, site in zip(table.age, table.sex, table.localization)
    ]
    metadata = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in m.items()} for m in metadata]
    scores = np.array([malignant_probability(manifest, p.probabilities) for p in predictor.predict(images, metadata)])
    malignant, fold = table.dx.isin(MALIGNANT_CLASSES).to_numpy(), table.fold.to_numpy()
    for point in triage.points:
        assert point.threshold == pytest.approx(threshold_for(scores, malignant, point.target_sensitivity), abs=1e-5)
        refer = scores >= nested_thresholds(scores, malignant, fold, point.target_sensitivity)
        figures = decision_figures(refer, malignant)
        assert point.sensitivity.value == pytest.approx(figures["sensitivity"], abs=0.01)
        assert point.specificity.value == pytest.approx(figures["specificity"], abs=0.01)


def test_the_served_meta_learner_never_saw_a_calibration_lesion(smoke_run):
    run = Run(saved_config(smoke_run), smoke_run, log=lambda m: None)
    cfg, table = run.cfg, run.table
    z = stack_inputs({m: run.oof(m)[PROB_COLUMNS].to_numpy() for m in cfg.level1}, cfg.level1)
    y, fold, refit = table.label.to_numpy(), table.fold.to_numpy(), run.refit_rows
    served = pickle.loads(run.paths.model(STACK).read_bytes())
    without = make_meta_learner(fold[refit]).fit(z[refit], y[refit])
    with_all = make_meta_learner(fold).fit(z, y)
    assert np.abs(served.predict_proba(z) - without.predict_proba(z)).max() < 1e-6
    assert np.abs(served.predict_proba(z) - with_all.predict_proba(z)).max() > 1e-3


def test_the_served_boosters_never_saw_a_calibration_lesion(smoke_run):
    """XGBoost refit on the refit rows with the run's rounds and seed gives the served model's answers."""
    from training.ensemble.boosters import BOOSTERS, balanced, feature_matrix

    run = Run(saved_config(smoke_run), smoke_run, log=lambda m: None)
    served = pickle.loads(run.paths.model("xgboost").read_bytes())
    x, y, refit = feature_matrix(run), run.table.label.to_numpy(), run.refit_rows
    rounds = served.get_params()["n_estimators"]

    def fitted(rows: np.ndarray) -> np.ndarray:
        model = BOOSTERS["xgboost"].make(rounds, run.cfg.seed, False)
        return model.fit(x[rows], y[rows], sample_weight=balanced(y[rows])).predict_proba(x)

    assert np.abs(served.predict_proba(x) - fitted(refit)).max() < 1e-5
    assert np.abs(served.predict_proba(x) - fitted(np.ones(len(y), bool))).max() > 1e-3
