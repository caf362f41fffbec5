"""Triage operating points (training/evaluation/triage.py): the boundary cases that
tests/training/test_triage.py leaves open, each computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.triage import Figure, OperatingPoint
from tests.helpers import with_malignant_sum
from training.evaluation.triage import (
    check_lines,
    check_points,
    choose_points,
    decision_figures,
    operating_point,
    threshold_for,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
MALIGNANT = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0, 1], bool)  # malignant scores: .9 .7 .6 .4 .2 .05


def test_a_low_target_still_refers_one_malignant_row_and_no_more():
    assert threshold_for(SCORES, MALIGNANT, 0.1) == 0.9  # 0.6 of a row -> 1 row: the top malignant score
    assert threshold_for(SCORES, MALIGNANT, 0.01) == 0.9


def test_malignant_may_be_given_as_0_and_1():
    as_int = MALIGNANT.astype(int)
    for target in (0.1, 0.5, 0.9):
        assert threshold_for(SCORES, as_int, target) == threshold_for(SCORES, MALIGNANT, target)


def test_one_row_on_a_side_gives_a_figure_and_none_gives_nan():
    refer, malignant = np.array([True, False]), np.array([True, False])
    f = decision_figures(refer, malignant)
    assert f == {"sensitivity": 1.0, "specificity": 1.0, "referral_share": 0.5, "ppv": 1.0, "npv": 1.0}
    f = decision_figures(np.array([False, False]), malignant)
    assert f["sensitivity"] == 0.0 and f["referral_share"] == 0.0 and np.isnan(f["ppv"])


def test_a_score_equal_to_its_folds_threshold_is_referred():
    """Two scores only: each fold's threshold is a score its own rows also have."""
    scores = np.array([0.8, 0.2, 0.8, 0.2, 0.8, 0.2])
    malignant = np.array([1, 0, 1, 0, 1, 0], bool)
    fold = np.array([0, 0, 1, 1, 2, 2])
    p = operating_point(scores, malignant, fold, np.arange(6), 0.9, 20, 0)
    assert p.threshold == 0.8 and p.sensitivity.value == 1.0 and p.referral_share.value == 0.5


def test_the_points_and_their_intervals_are_reproducible_from_the_seed():
    rng = np.random.default_rng(3)
    n = 200
    lesions = np.arange(n) // 2
    fold, malignant = rng.integers(0, 4, n // 2)[lesions], (rng.random(n // 2) < 0.3)[lesions]
    scores = np.clip(rng.normal(0.3 + 0.3 * malignant, 0.2), 0.001, 0.999)

    def spec(seed: int):
        return choose_points(
            with_malignant_sum(scores),
            malignant,
            fold,
            lesions,
            "mean",
            [0.9],
            0.9,
            30,
            seed,
            "out-of-fold",
            "known scores",
        )

    first = spec(0)
    assert spec(0) == first
    assert spec(1).points[0].sensitivity.ci95 != first.points[0].sensitivity.ci95
    assert spec(1).lesion_points[0].sensitivity.ci95 != first.lesion_points[0].sensitivity.ci95


def point(threshold: float, sensitivity: float, specificity: float = 0.5, name: str = "sensitivity-0.95"):
    f = lambda v: Figure(value=v, ci95=[v - 0.02, v + 0.02])  # noqa: E731
    return OperatingPoint(
        name=name,
        target_sensitivity=0.95,
        threshold=threshold,
        sensitivity=f(sensitivity),
        specificity=f(specificity),
        referral_share=f(0.6),
        ppv=f(0.4),
        npv=f(0.9),
    )


MAL = np.array([1] * 40 + [0] * 60, bool)
NEW_SCORES = np.concatenate([np.linspace(0.3, 0.9, 40), np.linspace(0.0, 0.5, 60)])


def test_a_check_row_says_what_it_checks_with_lesion_bootstrap_intervals():
    p = point(0.7, 0.95)
    (row,) = check_points(NEW_SCORES, MAL, np.arange(100), [p], 200, 0)
    assert row["point"] == "sensitivity-0.95" and row["threshold"] == 0.7 and row["target_sensitivity"] == 0.95
    assert row["specificity"]["value"] == 1.0  # every benign score is under 0.7
    for k in ("sensitivity", "referral_share"):
        lo, hi = row[k]["ci95"]
        assert lo < row[k]["value"] < hi  # the bootstrap varies the figure: the interval has a width
    for k in ("sensitivity", "specificity", "referral_share"):
        assert row[k]["promised"] == getattr(p, k).value and row[k]["promised_ci95"] == getattr(p, k).ci95
    assert check_points(NEW_SCORES, MAL, np.arange(100), [p], 200, 0) == [row]


def test_a_promise_holds_when_the_interval_reaches_it():
    """Every malignant image referred: the sensitivity interval is [1, 1], which reaches a promise of 1."""
    (row,) = check_points(NEW_SCORES, MAL, np.arange(100), [point(0.3, 1.0, specificity=0.6)], 50, 0)
    assert row["sensitivity"]["ci95"] == [1.0, 1.0] and row["holds"]


def rows() -> list[dict]:
    def figure(value, lo, hi, promised):
        return {"value": value, "ci95": [lo, hi], "promised": promised, "promised_ci95": [promised, promised]}

    def row(name, holds):
        return {
            "point": name,
            "threshold": 0.41234,
            "target_sensitivity": 0.9,
            "sensitivity": figure(0.9, 0.8, 0.95, 0.9),
            "specificity": figure(0.5, 0.4, 0.6, 0.5),
            "referral_share": figure(0.6, 0.55, 0.65, 0.6),
            "holds": holds,
        }

    return [row("sensitivity-0.9", True), row("sensitivity-0.95", False), row("sensitivity-0.98", False)]


def test_the_check_table_gives_each_figure_with_its_interval_and_verdict():
    lines = check_lines("New data", rows())
    assert lines[:2] == ["## New data", ""]
    table = lines[2:7]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert table[1] == "|---|---|---|---|---|---|---|---|"
    assert all(line.count("|") == 9 for line in table)  # 8 columns
    assert table[2] == (
        "| sensitivity-0.9 | 0.4123 | 0.900 [0.800, 0.950] | 0.900 | 0.500 [0.400, 0.600] | 0.500 "
        "| 0.600 [0.550, 0.650] | yes |"
    )
    assert table[3].endswith("| **no** |") and table[4].endswith("| **no** |")
    assert lines[7] == "" and len(lines) == 9
    assert lines[8].startswith("The promise of sensitivity-0.95, sensitivity-0.98 does not hold on this data")


def test_when_every_promise_holds_the_table_says_so():
    held = [r | {"holds": True} for r in rows()]
    lines = check_lines("t", held)
    assert lines[-1].startswith("Every point's promise holds here")
    assert all(line.endswith("| yes |") for line in lines[4:7])


@pytest.mark.parametrize("broken", [[0], [2]])
def test_the_sentence_names_only_the_broken_points(broken):
    rs = [r | {"holds": i not in broken} for i, r in enumerate(rows())]
    names = [rs[i]["point"] for i in broken]
    assert check_lines("t", rs)[-1].startswith(f"The promise of {', '.join(names)} does not hold")
