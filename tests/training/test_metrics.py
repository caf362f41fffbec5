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


def replicate_rows(y, probs, w):
    """Each row repeated as often as its weight: what a bootstrap weight stands for."""
    rows = np.repeat(np.arange(len(y)), w.astype(int))
    return y[rows], probs[rows]


@pytest.mark.parametrize("absent", [None, 6])
def test_a_row_weight_counts_as_that_many_copies_of_the_row(absent):
    """The bootstrap's weights (0, 1, 2, ...) give every metric of the rows drawn that many times."""
    rng = np.random.default_rng(4)
    y = np.arange(140) % 7
    probs = rng.dirichlet(np.ones(7), len(y)) + 0.5 * np.eye(7)[y]
    probs /= probs.sum(1, keepdims=True)
    w = rng.integers(0, 4, len(y)).astype(float)
    if absent is not None:
        w[y == absent] = 0  # a class no drawn lesion has: macro AUC is undefined
    weighted = all_metrics(y, probs, w)
    copies = all_metrics(*replicate_rows(y, probs, w))
    assert set(weighted) == {"bmca", "macro_auc", "accuracy", "log_loss", "ece", "malignant_auc", "malignant_pauc"}
    assert weighted == pytest.approx(copies, rel=1e-9, nan_ok=True)
    assert np.isnan(weighted["macro_auc"]) == (absent is not None)
    assert weighted != pytest.approx(all_metrics(y, probs), rel=1e-3, nan_ok=True)  # the weights change each figure


def test_a_class_missing_from_the_labels_leaves_macro_auc_undefined_and_the_rest_defined():
    rng = np.random.default_rng(5)
    y = np.arange(60) % 6  # no vasc
    m = all_metrics(y, rng.dirichlet(np.ones(7), len(y)))
    assert np.isnan(m["macro_auc"]) and not any(np.isnan(v) for k, v in m.items() if k != "macro_auc")


def test_a_confident_mistake_costs_the_log_of_the_1e_12_floor():
    y = np.array([0, 1])
    wrong = np.eye(7)[[1, 0]]  # probability 0 on the true class, clipped to 1e-12 and renormalised
    assert all_metrics(y, wrong)["log_loss"] == pytest.approx(-np.log(1e-12 / (1 + 6e-12)), rel=1e-9)


def test_ece_by_hand_in_15_equal_width_bins():
    # confidences 1.0 (wrong), 0.9 (right), 0.5 (wrong): bins 14, 13 and 7, one row each
    probs = np.array([[0.0, 1.0], [0.9, 0.1], [0.5, 0.5]])
    assert ece(np.array([0, 0, 1]), probs) == pytest.approx((1.0 + 0.1 + 0.5) / 3)
    # 0.49 and 0.51 share the bin [7/15, 8/15): one right and one wrong at a mean confidence of 0.5
    assert ece(np.array([0, 1]), np.array([[0.49, 0.3, 0.21], [0.51, 0.49, 0.0]])) == pytest.approx(0.0, abs=1e-12)
    # weights: the wrong 0.5 row counted 3 times
    assert ece(np.array([0, 0, 1]), probs, sample_weight=[1, 1, 3]) == pytest.approx((1.0 + 0.1 + 1.5) / 5)


def test_pauc_with_tied_scores_equals_sklearn_mcclish_rescaled():
    """Ties put sloped segments on the ROC curve, one of them across the pAUC's edge."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 400)
    s = np.round(y * rng.normal(1, 1, 400) + rng.normal(0, 1, 400), 0)  # a few distinct scores
    mcclish = roc_auc_score(1 - y, -s, max_fpr=0.2)
    lo, hi = 0.5 * 0.2**2, 0.2
    assert isic_pauc(y, s) == pytest.approx(lo + (2 * mcclish - 1) * (hi - lo), abs=1e-12)


def test_bootstrap_weights_draw_every_lesion_and_repeat_with_the_seed():
    lesions = np.array(["a", "b", "c"])
    draws = np.array(list(lesion_bootstrap_weights(lesions, 300, seed=2)))
    assert (draws > 0).any(0).all() and draws.mean(0) == pytest.approx([1, 1, 1], abs=0.2)
    assert np.array_equal(draws, list(lesion_bootstrap_weights(lesions, 300, seed=2)))
    assert not np.array_equal(draws, list(lesion_bootstrap_weights(lesions, 300, seed=3)))


def test_intervals_are_the_replicates_percentiles_and_the_pair_is_a_minus_b():
    rng = np.random.default_rng(7)
    y = np.arange(140) % 7
    lesions = np.arange(len(y)) // 2
    probs = {"stack": rng.dirichlet(np.ones(7), len(y)) + 0.3 * np.eye(7)[y], "cnn": rng.dirichlet(np.ones(7), len(y))}
    rep = with_intervals(y, probs, lesions, n_boot=20, seed=3)
    assert rep["n_bootstrap"] == 20 and rep["paired_difference"]["models"] == "stack - cnn"
    reps = [all_metrics(y, probs["stack"], w) for w in lesion_bootstrap_weights(lesions, 20, 3)]
    for k in ("bmca", "log_loss", "malignant_pauc"):
        values = [r[k] for r in reps]
        assert rep["models"]["stack"][k]["ci95"] == pytest.approx(np.percentile(values, [2.5, 97.5]), rel=1e-12)
        d = rep["paired_difference"].get(k)
        if d:
            assert d["value"] == rep["models"]["stack"][k]["value"] - rep["models"]["cnn"][k]["value"]
    assert with_intervals(y, probs, lesions, n_boot=20, seed=3) == rep
    assert (
        with_intervals(y, probs, lesions, n_boot=20, seed=4)["models"]["stack"]["bmca"]
        != rep["models"]["stack"]["bmca"]
    )


def test_without_both_of_the_pair_there_is_no_paired_difference():
    rng = np.random.default_rng(8)
    y = np.arange(70) % 7
    rep = with_intervals(y, {"stack": rng.dirichlet(np.ones(7), 70)}, np.arange(70), n_boot=3, seed=0)
    assert "paired_difference" not in rep and set(rep["models"]) == {"stack"}


def test_a_metric_undefined_in_every_replicate_has_an_undefined_interval():
    rng = np.random.default_rng(9)
    y = np.arange(60) % 6  # no vasc: macro AUC undefined in every replicate
    rep = with_intervals(y, {"stack": rng.dirichlet(np.ones(7), 60)}, np.arange(60), n_boot=3, seed=0)
    assert np.isnan(rep["models"]["stack"]["macro_auc"]["ci95"]).all()
    assert not np.isnan(rep["models"]["stack"]["bmca"]["ci95"]).any()


def test_weights_of_1_are_the_unweighted_metrics():
    """A lesion drawn once counts once: with every weight 1 each class is present, macro AUC included."""
    rng = np.random.default_rng(10)
    y = np.arange(70) % 7
    probs = rng.dirichlet(np.ones(7), len(y))
    assert all_metrics(y, probs, np.ones(len(y))) == pytest.approx(all_metrics(y, probs), rel=1e-12)
    assert not np.isnan(all_metrics(y, probs, np.ones(len(y)))["macro_auc"])
