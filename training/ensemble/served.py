"""The served answer recomputed from any CNN probabilities: the level-2 models given what the
service would give them.

The int8 gate (training/stages/quantize.py) asks what a person would receive from an int8 CNN, so
it runs the fp32 and the int8 CNN's probabilities through the same level-2 models: out-of-fold,
each row through the boosters and meta-learner of the outer fold that held it out
(models/fold<k>/); for the refit CNN, every row through the refit models (models/<name>.pkl).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.core.features import soft_vote, stack_inputs
from training.config import SOFT_VOTE, STACK
from training.data.io import PROB_COLUMNS
from training.ensemble.boosters import feature_matrix
from training.run import Run


def level2_answers(
    features: np.ndarray,
    cnn_probs: Mapping[str, np.ndarray],
    boosters: Mapping[str, Any],
    stack: Any,
    level1: Sequence[str],
) -> dict[str, np.ndarray]:
    """Every model's probabilities for rows with these booster features and CNNs' probabilities."""
    probs = {**cnn_probs, **{name: model.predict_proba(features) for name, model in boosters.items()}}
    probs[SOFT_VOTE] = soft_vote(probs, level1)
    probs[STACK] = stack.predict_proba(stack_inputs(probs, level1))
    return probs


def load(path: Path) -> Any:
    return pickle.loads(path.read_bytes())


def oof_answers(run: Run, cnn_probs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's answers from the level-2 models of the outer fold that never saw its lesion.

    Given the CNNs' out-of-fold probabilities (by name), this reproduces artifacts/oof_<model>.csv."""
    x, fold = feature_matrix(run, cnn_probs), run.table.fold.to_numpy()
    out = {m: np.zeros((len(fold), len(PROB_COLUMNS))) for m in run.cfg.components}
    for k in range(run.cfg.folds):
        rows = fold == k
        boosters = {b: load(run.paths.fold_level2(b, k)) for b in run.cfg.boosters}
        stack = load(run.paths.fold_level2(STACK, k))
        cnns = {name: p[rows] for name, p in cnn_probs.items()}
        for m, p in level2_answers(x[rows], cnns, boosters, stack, run.cfg.level1).items():
            out[m][rows] = p
    return out


def refit_answers(
    run: Run, cnn_probs: Mapping[str, np.ndarray], rows: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The served level-2 models' answers for `rows` (row indices; default: all), given the CNNs'
    probabilities for those rows."""
    boosters = {b: load(run.paths.model(b)) for b in run.cfg.boosters}
    x = feature_matrix(run, cnn_probs, rows)
    return level2_answers(x, cnn_probs, boosters, load(run.paths.model(STACK)), run.cfg.level1)
