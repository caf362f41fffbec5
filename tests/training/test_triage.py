"""Triage operating points chosen out-of-fold (training/evaluation/triage.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.triage import TriageSpec
from tests.helpers import with_malignant_sum
from training.evaluation.triage import choose_points, decision_figures, nested_thresholds, threshold_for


def test_the_threshold_refers_the_target_share_of_malignant_rows_and_no_more_is_needed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    malignant = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0, 1], bool)  # malignant scores: .9 .7 .6 .4 .2 .05
    assert threshold_for(scores, malignant, 0.5) == 0.6  # 3 of 6 referred at >= 0.6
    assert threshold_for(scores, malignant, 0.51) == 0.4  # 3.06 -> 4 of 6
    assert threshold_for(scores, malignant, 4 / 6) == 0.4  # exactly 4 of 6: no rounding up past it
    assert threshold_for(scores, malignant, 0.99) == 0.05
    for target in (0.3, 0.5, 0.8, 0.95):
        t = threshold_for(scores, malignant, target)
        assert np.mean(scores[malignant] >= t) >= target  # the promise holds on the rows it was chosen on
        assert np.mean(scores[malignant] > t) < target  # and the threshold is the largest that keeps it
    with pytest.raises(ValueError, match="no malignant image"):
        threshold_for(scores, np.zeros(10, bool), 0.9)


def test_each_fold_is_decided_by_a_threshold_chosen_without_it():
    rng = np.random.default_rng(0)
    n = 300
    fold = np.arange(n) % 3
    malignant = rng.random(n) < 0.3
    scores = np.clip(rng.normal(0.3 + 0.4 * malignant, 0.2), 0, 1)
    got = nested_thresholds(scores, malignant, fold, 0.9)
    for k in range(3):
        others = fold != k
        assert np.all(got[fold == k] == threshold_for(scores[others], malignant[others], 0.9))
    moved = scores.copy()
    moved[fold == 0] = rng.random((fold == 0).sum())  # fold 0's own scores cannot move its threshold
    assert np.all(nested_thresholds(moved, malignant, fold, 0.9)[fold == 0] == got[fold == 0])
    assert not np.all(nested_thresholds(moved, malignant, fold, 0.9)[fold == 1] == got[fold == 1])


def test_decision_figures_are_exact_on_known_decisions():
    refer = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    malignant = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    f = decision_figures(refer, malignant)
    assert f["sensitivity"] == pytest.approx(2 / 3) and f["specificity"] == pytest.approx(3 / 5)
    assert f["referral_share"] == pytest.approx(4 / 8) and f["ppv"] == pytest.approx(2 / 4)
    assert f["npv"] == pytest.approx(3 / 4)
    w = np.array([2, 1, 1, 1, 1, 1, 1, 1], float)  # a lesion drawn twice weighs twice
    assert decision_figures(refer, malignant, w)["sensitivity"] == pytest.approx(3 / 4)


def test_the_points_report_the_nested_figures_and_serve_the_all_rows_threshold():
    rng = np.random.default_rng(1)
    n = 600
    lesions = np.arange(n) // 2  # two images per lesion, in one fold, of one diagnosis
    fold, malignant = rng.integers(0, 5, n // 2)[lesions], (rng.random(n // 2) < 0.25)[lesions]
    scores = np.clip(rng.normal(0.25 + 0.35 * malignant, 0.18), 0.001, 0.999)
    spec = choose_points(
        with_malignant_sum(scores),
        malignant,
        fold,
        lesions,
        "mean",
        [0.98, 0.9, 0.95],
        0.95,
        50,
        0,
        "out-of-fold",
        "known scores",
    )
    spec = TriageSpec.model_validate_json(spec.model_dump_json())  # as the bundle carries it
    assert [p.name for p in spec.points] == ["sensitivity-0.9", "sensitivity-0.95", "sensitivity-0.98"]
    assert spec.default == "sensitivity-0.95" and spec.images == n and spec.lesions == n // 2
    thresholds = [p.threshold for p in spec.points]
    assert thresholds == sorted(thresholds, reverse=True)  # a higher sensitivity refers more: nested thresholds
    for p in spec.points:
        assert p.threshold == threshold_for(scores, malignant, p.target_sensitivity)
        refer = scores >= nested_thresholds(scores, malignant, fold, p.target_sensitivity)
        exact = decision_figures(refer, malignant)
        assert p.sensitivity.value == exact["sensitivity"] and p.specificity.value == exact["specificity"]
        assert p.referral_share.value == exact["referral_share"] and p.ppv.value == exact["ppv"]
        lo, hi = p.sensitivity.ci95
        assert lo <= p.sensitivity.value <= hi and hi - lo > 0
    assert spec.point(None).name == "sensitivity-0.95" and spec.point("sensitivity-0.9").target_sensitivity == 0.9
    with pytest.raises(KeyError):
        spec.point("sensitivity-0.5")
    lesion_scores = (scores[0::2] + scores[1::2]) / 2  # the mean rule, one row per lesion
    for p in spec.lesion_points:  # per lesion: the same rule on lesion rows
        assert p.threshold == threshold_for(lesion_scores, malignant[0::2], p.target_sensitivity)
        refer = lesion_scores >= nested_thresholds(lesion_scores, malignant[0::2], fold[0::2], p.target_sensitivity)
        assert p.sensitivity.value == decision_figures(refer, malignant[0::2])["sensitivity"]
    assert spec.point("sensitivity-0.98", lesion=True) == spec.lesion_points[-1]


def test_a_default_that_is_not_a_target_is_refused():
    from training.config import make_config
    from training.errors import ConfigMismatch

    assert make_config("smoke", "d", triage="0.8,0.9", triage_default=0.9).triage == [0.8, 0.9]
    with pytest.raises(ConfigMismatch, match="triage_default 0.95 must be one of the --triage targets"):
        make_config("smoke", "d", triage="0.8,0.9")
    with pytest.raises(ConfigMismatch, match="--triage: triage must list target sensitivities"):
        make_config("smoke", "d", triage="0.9,1.5")


def test_new_data_checks_each_promise_and_says_when_it_does_not_hold():
    from service.core.triage import Figure, OperatingPoint
    from training.evaluation.triage import check_lines, check_points

    def point(threshold: float, sensitivity: float) -> OperatingPoint:
        f = lambda v: Figure(value=v, ci95=[v - 0.02, v + 0.02])  # noqa: E731
        return OperatingPoint(
            name="sensitivity-0.95",
            target_sensitivity=0.95,
            threshold=threshold,
            sensitivity=f(sensitivity),
            specificity=f(0.5),
            referral_share=f(0.6),
            ppv=f(0.4),
            npv=f(0.9),
        )

    malignant = np.array([1] * 40 + [0] * 60, bool)
    scores = np.concatenate([np.linspace(0.3, 0.9, 40), np.linspace(0.0, 0.5, 60)])
    lesions = np.arange(100)
    (ok,) = check_points(scores, malignant, lesions, [point(0.3, 0.95)], 200, 0)
    assert ok["sensitivity"]["value"] == 1.0 and ok["specificity"]["value"] == pytest.approx(36 / 60) and ok["holds"]
    (broken,) = check_points(scores, malignant, lesions, [point(0.7, 0.95)], 200, 0)  # refers a third of them
    assert broken["sensitivity"]["value"] == pytest.approx(14 / 40) and not broken["holds"]
    assert broken["sensitivity"]["ci95"][1] < 0.95 and broken["sensitivity"]["promised"] == 0.95
    text = "\n".join(check_lines("t", [ok, broken]))
    assert "| **no** |" in text and "does not hold on this data" in text
