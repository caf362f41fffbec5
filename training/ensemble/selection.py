"""Choices made by a rule fixed in advance, inside the outer folds: which combiner the bundle serves
(the soft vote, the stack or a single booster) and how a lesion's images are combined.

The rule (`RULE`): the highest malignant pAUC (ISIC 2024); candidates within `PAUC_TIE` of the
best are tied, and the tie goes to the highest BMCA, then to the candidate listed first.

Nested: for each outer fold k the rule picks on the out-of-fold rows of the other folds, and fold
k's rows take that pick's out-of-fold predictions, so the chosen pipeline's reported figure is
out-of-fold: no fold's labels chose what it is scored with. (The other folds' out-of-fold rows come
from level-1 models that trained on fold k; re-training them inside each outer fold would cost a
second full cross-validation.) The served choice is the rule applied to every row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel
from sklearn.metrics import balanced_accuracy_score

from service.core.lesions import LESION_RULES, by_lesion, group_codes
from service.core.manifest import Choice
from training.evaluation.metrics import MALIGNANT_IDX, isic_pauc, malignant_score

METRIC, TIE_BREAK = "malignant_pauc", "bmca"
PAUC_TIE = 0.001  # pAUC spans 0-0.2: a difference under 0.5 % of that range is a tie
RULE = f"highest out-of-fold malignant pAUC; within {PAUC_TIE} of the best, highest BMCA"


def scores_of(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    malignant = np.isin(y, MALIGNANT_IDX).astype(int)
    return {
        METRIC: isic_pauc(malignant, malignant_score(probs)),
        TIE_BREAK: float(balanced_accuracy_score(y, probs.argmax(1))),
    }


def pick(scores: Mapping[str, Mapping[str, float]]) -> str:
    """The rule on candidates' scores (in candidate order)."""
    best = max(s[METRIC] for s in scores.values())
    tied = [name for name, s in scores.items() if s[METRIC] >= best - PAUC_TIE]
    return max(tied, key=lambda name: scores[name][TIE_BREAK])  # max keeps the first of equals


def nested_choice(
    y: np.ndarray, fold: np.ndarray, candidates: Mapping[str, np.ndarray], requested: str | None = None
) -> tuple[Choice, np.ndarray]:
    """The rule's pick on every row, its pick without each outer fold, and the nested predictions:
    each fold's rows from the candidate picked without them. `requested` overrides the served pick
    (recorded as such); the nested predictions are the rule's either way."""
    names = list(candidates)
    nested = np.zeros_like(candidates[names[0]], dtype=np.float64)
    fold_picks = []
    for k in np.unique(fold):
        rest = fold != k
        name = pick({n: scores_of(y[rest], candidates[n][rest]) for n in names})
        fold_picks.append(name)
        nested[fold == k] = candidates[name][fold == k]
    scores = {n: scores_of(y, candidates[n]) for n in names}
    picked = pick(scores)
    choice = Choice(
        chosen=requested or picked, picked=picked, requested=requested, rule=RULE, scores=scores, fold_picks=fold_picks
    )
    return choice, nested


def lesion_rows(y: np.ndarray, fold: np.ndarray, lesion_ids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each lesion's id, label and fold (those of its first image: a lesion has one diagnosis and one fold)."""
    ids, codes = group_codes(lesion_ids)
    rows = np.unique(codes, return_index=True)[1]  # each lesion's first image, in `by_lesion`'s order
    return ids, y[rows], fold[rows]


def choose_lesion_rule(
    y: np.ndarray, fold: np.ndarray, lesion_ids: np.ndarray, probs: np.ndarray
) -> tuple[Choice, np.ndarray]:
    """The lesion rule chosen on lesions (one row each) by the same rule, nested in the same folds;
    returns the choice and the nested lesion-level predictions."""
    _, y_lesion, fold_lesion = lesion_rows(y, fold, lesion_ids)
    candidates: dict[str, np.ndarray] = {rule: by_lesion(probs, lesion_ids, rule)[1] for rule in LESION_RULES}
    return nested_choice(y_lesion, fold_lesion, candidates)


class Selection(BaseModel):
    """What the select stage writes: the served combiner and the lesion rule, each with its reasons."""

    combiner: Choice
    lesion_rule: Choice


@dataclass
class Outcome:
    selection: Selection
    nested_images: np.ndarray  # per image: the combiner picked without the image's fold
    nested_lesions: np.ndarray  # per lesion: that pipeline's answers combined by the rule picked without its fold


def select(
    y: np.ndarray,
    fold: np.ndarray,
    lesion_ids: np.ndarray,
    probs: Mapping[str, np.ndarray],
    candidates: Sequence[str],
    requested: str | None = None,
) -> Outcome:
    """The served combiner among `candidates` (or `requested`, any model of `probs`), then the lesion
    rule on its out-of-fold answers; and the fully nested pipeline's predictions (both choices made
    without each outer fold), whose figures are the honest ones for the choices together."""
    combiner, nested_images = nested_choice(y, fold, {c: probs[c] for c in candidates}, requested)
    lesion_rule, _ = choose_lesion_rule(y, fold, lesion_ids, probs[combiner.chosen])
    _, nested_lesions = choose_lesion_rule(y, fold, lesion_ids, nested_images)
    return Outcome(Selection(combiner=combiner, lesion_rule=lesion_rule), nested_images, nested_lesions)
