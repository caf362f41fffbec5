"""The served combiner and the lesion rule, chosen by the rule fixed in advance, nested in the folds."""

import numpy as np
import pytest

from service.core import labels
from training.ensemble.selection import PAUC_TIE, nested_choice, pick, scores_of, select
from training.evaluation.metrics import MALIGNANT_IDX

N_CLASSES = len(labels.CLASSES)


def dataset(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    lesions = np.array([f"L{i // 2}" for i in range(n)])  # two images per lesion
    y = y[np.arange(n) // 2 * 2]  # one diagnosis per lesion
    fold = (np.arange(n) // 2) % 5
    return rng, y, lesions, fold


def informative(rng, y, signal: float) -> np.ndarray:
    """Probabilities whose logits carry the true class with strength `signal`."""
    logits = rng.normal(size=(len(y), N_CLASSES))
    logits[np.arange(len(y)), y] += signal
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("winner", ["soft_vote", "stack"])
def test_the_better_combiner_is_served_in_every_fold(winner):
    rng, y, lesions, fold = dataset()
    loser = "stack" if winner == "soft_vote" else "soft_vote"
    probs = {
        winner: informative(rng, y, 3.0),
        loser: informative(rng, y, 0.5),
        "xgboost": informative(rng, y, 0.3),
    }
    out = select(y, fold, lesions, probs, ["soft_vote", "stack", "xgboost"])
    c = out.selection.combiner
    assert c.chosen == c.picked == winner and c.fold_picks == [winner] * 5 and c.requested is None
    assert c.scores[winner]["malignant_pauc"] > c.scores[loser]["malignant_pauc"]
    np.testing.assert_array_equal(out.nested_images, probs[winner])  # every fold picked it
    assert out.selection.lesion_rule.chosen in ("mean", "log_mean")
    assert out.nested_lesions.shape == (len(np.unique(lesions)), N_CLASSES)


def test_a_request_overrides_the_rule_which_is_still_recorded():
    rng, y, lesions, fold = dataset()
    probs = {"soft_vote": informative(rng, y, 3.0), "stack": informative(rng, y, 0.5), "cnn": informative(rng, y, 0)}
    out = select(y, fold, lesions, probs, ["soft_vote", "stack"], requested="stack")
    c = out.selection.combiner
    assert (c.chosen, c.picked, c.requested) == ("stack", "soft_vote", "stack")
    np.testing.assert_array_equal(out.nested_images, probs["soft_vote"])  # the figure of choosing: the rule's


def test_ties_on_pauc_go_to_bmca_then_to_the_first_listed():
    close = {"a": {"malignant_pauc": 0.10, "bmca": 0.50}, "b": {"malignant_pauc": 0.10 + PAUC_TIE / 2, "bmca": 0.40}}
    assert pick(close) == "a"  # b's pAUC is higher by less than the tie margin; a has the better BMCA
    apart = {"a": {"malignant_pauc": 0.10, "bmca": 0.50}, "b": {"malignant_pauc": 0.10 + 2 * PAUC_TIE, "bmca": 0.40}}
    assert pick(apart) == "b"
    equal = {"a": {"malignant_pauc": 0.1, "bmca": 0.5}, "b": {"malignant_pauc": 0.1, "bmca": 0.5}}
    assert pick(equal) == "a"


def test_each_fold_is_scored_with_the_pick_made_without_it():
    """A candidate that is best only on fold 0 is not what fold 0 is scored with (nothing chose it
    there by looking at fold 0's labels)."""
    rng, y, lesions, fold = dataset(n=1000, seed=3)
    good_on_0 = informative(rng, y, 0.2)
    good_on_0[fold == 0] = informative(rng, y[fold == 0], 6.0)
    steady = informative(rng, y, 1.5)
    choice, nested = nested_choice(y, fold, {"steady": steady, "spiky": good_on_0})
    assert choice.fold_picks[0] == "steady"
    np.testing.assert_array_equal(nested[fold == 0], steady[fold == 0])


def test_a_candidate_that_wins_overall_only_through_one_fold_is_not_picked_for_that_fold():
    """The overall pick and the nested one differ: "spiky" wins on every row only because of fold 0,
    so fold 0, chosen without its own labels, is scored with "steady" and the other folds with
    "spiky". A choice made once on every row (the leak nesting prevents) would give fold 0 "spiky"."""
    rng, y, lesions, fold = dataset(n=1000, seed=3)
    spiky = informative(rng, y, 0.6)
    spiky[fold == 0] = informative(rng, y[fold == 0], 10.0)
    steady = informative(rng, y, 0.9)
    choice, nested = nested_choice(y, fold, {"steady": steady, "spiky": spiky})
    assert choice.picked == "spiky" and choice.fold_picks == ["steady", "spiky", "spiky", "spiky", "spiky"]
    np.testing.assert_array_equal(nested[fold == 0], steady[fold == 0])
    np.testing.assert_array_equal(nested[fold != 0], spiky[fold != 0])


def test_scores_are_the_isic_pauc_and_bmca():
    rng, y, _, _ = dataset()
    p = informative(rng, y, 2.0)
    s = scores_of(y, p)
    assert 0 < s["malignant_pauc"] <= 0.2 and 0 < s["bmca"] <= 1
    assert np.isin(y, MALIGNANT_IDX).any()


def test_a_candidate_exactly_the_tie_margin_below_the_best_is_tied():
    edge = {"a": {"malignant_pauc": 0.125, "bmca": 0.5}, "b": {"malignant_pauc": 0.125 - PAUC_TIE, "bmca": 0.6}}
    assert pick(edge) == "b"  # within PAUC_TIE of the best, the margin included: the better BMCA wins


def test_one_candidate_is_chosen_in_every_fold():
    rng, y, _, fold = dataset()
    only = informative(rng, y, 1.0)
    choice, nested = nested_choice(y, fold, {"only": only})
    assert choice.chosen == choice.picked == "only" and choice.fold_picks == ["only"] * 5
    np.testing.assert_array_equal(nested, only)
