"""The lesion rule: known answers for both rules, grouping order, and agreement with a per-lesion loop."""

import numpy as np
import pytest

from service.core.lesions import LESION_RULES, by_lesion, combine_by_group, group_codes


def test_known_answers():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    ids, combined = by_lesion(probs, ["b", "b", "a"], "mean")
    assert ids == ["b", "a"]  # first appearance, not sorted
    np.testing.assert_allclose(combined, [[0.7, 0.3], [0.2, 0.8]])
    _, geometric = by_lesion(probs, ["b", "b", "a"], "log_mean")
    # sqrt(0.5 * 0.9) : sqrt(0.5 * 0.1) = 3 : 1
    np.testing.assert_allclose(geometric, [[0.75, 0.25], [0.2, 0.8]])


def test_one_image_lesions_keep_their_answer_and_rules_differ_on_disagreement():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=50)
    for rule in LESION_RULES:
        np.testing.assert_allclose(combine_by_group(probs, np.arange(50), rule), probs, atol=1e-12)
    a = combine_by_group(probs, np.zeros(50, np.int64), "mean")
    b = combine_by_group(probs, np.zeros(50, np.int64), "log_mean")
    assert not np.allclose(a, b) and np.allclose(a.sum(1), 1) and np.allclose(b.sum(1), 1)


@pytest.mark.parametrize("rule", LESION_RULES)
def test_vectorised_equals_a_loop_over_lesions(rule):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(7), size=200)
    lesion_ids = rng.integers(0, 60, 200).astype(str)
    ids, codes = group_codes(lesion_ids)
    got = combine_by_group(probs, codes, rule)
    for g, lesion in enumerate(ids):
        p = probs[lesion_ids == lesion]
        want = p.mean(0) if rule == "mean" else np.exp(np.log(p).mean(0))
        np.testing.assert_allclose(got[g], want / want.sum(), rtol=1e-9)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown lesion rule"):
        combine_by_group(np.ones((2, 2)) / 2, np.zeros(2, np.int64), "median")


def test_unknown_rule_names_the_rules():
    with pytest.raises(ValueError, match="unknown lesion rule 'median'; one of mean, log_mean"):
        combine_by_group(np.ones((2, 2)) / 2, np.zeros(2, np.int64), "median")


@pytest.mark.parametrize("rule", LESION_RULES)
def test_no_images_give_no_lesions(rule):
    ids, combined = by_lesion(np.zeros((0, 7)), [], rule)
    assert ids == [] and combined.shape == (0, 7)


@pytest.mark.parametrize("rule", LESION_RULES)
def test_views_certain_of_different_classes_give_a_finite_even_answer(rule):
    """A probability of 0 counts as 1e-12 in the log: two views each certain of another class tie."""
    _, combined = by_lesion(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), ["a", "a", "b"], rule)
    np.testing.assert_allclose(combined, [[0.5, 0.5], [0.0, 1.0]], atol=1e-12)


@pytest.mark.parametrize("rule", LESION_RULES)
def test_float32_answers_combine_as_their_float64_values(rule):
    """The graph's float32 probabilities and training's float64 ones go through the same float64 rule."""
    probs = np.random.default_rng(2).dirichlet(np.ones(7), size=9).astype(np.float32)
    codes = np.arange(9) % 3
    got = combine_by_group(probs, codes, rule)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, combine_by_group(probs.astype(np.float64), codes, rule), rtol=1e-12, atol=0)
