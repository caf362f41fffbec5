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
