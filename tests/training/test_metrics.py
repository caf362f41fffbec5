"""The ISIC 2024 pAUC, the other metrics, and the lesion bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.evaluation.metrics import (
    MALIGNANT_IDX,
    all_metrics,
    ece,
    isic_pauc,
    lesion_bootstrap_weights,
    with_intervals,
)


def test_pauc_hand_computed_cases():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert isic_pauc(y, np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])) == pytest.approx(0.2)  # perfect
    assert isic_pauc(y, -np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])) == pytest.approx(0.0)  # reversed
    # One positive ranked below every negative: TPR only reaches 0.75 before FPR 1, then 1.0 at FPR 1.
    # Area above TPR 0.8 is zero, since TPR >= 0.8 needs every negative called positive.
    assert isic_pauc(y, np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.7, 0.8, 0.9])) == pytest.approx(0.0)
    # Ten positives, ten negatives; the worst positive sits above 5 negatives. TPR reaches 0.9 at
    # FPR 0, then 1.0 at FPR 0.5. Above TPR 0.8: 0.1 over the whole [0,1] FPR range (TPR 0.8->0.9),
    # plus TPR 0.9->1.0 over FPR 0.5->1.0, i.e. 0.1 + 0.1 * 0.5 = 0.15.
    y = np.array([1] * 10 + [0] * 10)
    s = np.array([1.0] * 9 + [0.45] + [0.1 * i for i in range(10)])
    assert isic_pauc(y, s) == pytest.approx(0.15)


@pytest.mark.parametrize("seed", range(5))
def test_pauc_equals_sklearn_mcclish_rescaled(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = y * rng.normal(1, 1, 300) + rng.normal(0, 1, 300)
    max_fpr = 0.2
    mcclish = roc_auc_score(1 - y, -s, max_fpr=max_fpr)  # the flipped problem, as ISIC 2024 scores it
    lo, hi = 0.5 * max_fpr**2, max_fpr
    unstandardised = lo + (2 * mcclish - 1) * (hi - lo)
    assert isic_pauc(y, s) == pytest.approx(unstandardised, abs=1e-12)
    assert 0 <= isic_pauc(y, s) <= 0.2


def test_metrics_on_known_predictions():
    y = np.array([0, 1, 2, 3, 4, 5, 6] * 3)
    perfect = np.eye(7)[y] * 0.93 + 0.01  # rows sum to 1, top 0.94
    m = all_metrics(y, perfect)
    assert m["bmca"] == 1 and m["macro_auc"] == 1 and m["malignant_pauc"] == pytest.approx(0.2)
    assert m["ece"] == pytest.approx(0.06, abs=1e-9)  # always right with confidence 0.94
    wrong = np.eye(7)[(y + 1) % 7]
    assert all_metrics(y, wrong)["bmca"] == 0
    assert ece(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)


def test_bootstrap_resamples_whole_lesions():
    lesions = np.array(["a", "a", "b", "c", "c", "c"])
    for w in lesion_bootstrap_weights(lesions, 50, seed=1):
        assert w[0] == w[1] and w[3] == w[4] == w[5]
        assert w[[0, 2, 3]].sum() == 3  # three lesions drawn


def test_intervals_bracket_point_estimates_and_paired_difference():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 30)
    lesions = np.arange(len(y)) // 2
    good = np.clip(np.eye(7)[y] + rng.uniform(0, 0.8, (len(y), 7)), 0, None)
    good /= good.sum(1, keepdims=True)
    noise = rng.dirichlet(np.ones(7), len(y))
    rep = with_intervals(y, {"stack": good, "cnn": noise}, lesions, n_boot=40)
    for model in ("stack", "cnn"):
        for metric, v in rep["models"][model].items():
            lo, hi = v["ci95"]
            assert lo <= v["value"] + 1e-9 and v["value"] - 1e-9 <= hi, (model, metric)
    d = rep["paired_difference"]["bmca"]
    assert d["value"] > 0.3 and d["ci95"][0] > 0
    assert MALIGNANT_IDX == [0, 1, 4]
