"""Stage 5: soft vote and a stacked meta-learner over the level-1 models' OOF probabilities.

The meta-learner's OOF predictions for fold k come from a logistic regression fit on the other
folds' OOF rows only, so its reported score is cross-validated like every other model's.
The served meta-learner is refit on all rows.
"""

from __future__ import annotations

import pickle

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.core.features import soft_vote, stack_inputs
from training.config import SOFT_VOTE, STACK
from training.io import PROB_COLUMNS, atomic_write_bytes, write_oof


def make_meta_learner(fold: np.ndarray):
    """Standardised log-probabilities -> multinomial logistic regression. The regularisation
    strength is chosen by log loss over the given rows' own folds (nested, lesion-grouped)."""
    splits = [(np.flatnonzero(fold != g), np.flatnonzero(fold == g)) for g in np.unique(fold)]
    lr = LogisticRegressionCV(
        Cs=[1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        cv=splits,
        scoring="neg_log_loss",
        class_weight="balanced",
        max_iter=5000,
        l1_ratios=(0.0,),
        use_legacy_attributes=False,
    )
    return make_pipeline(StandardScaler(), lr)


def stack_stage(run) -> None:
    level1 = run.cfg.level1
    probs = {m: run.oof(m)[PROB_COLUMNS].to_numpy() for m in level1}
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    z = stack_inputs(probs, level1)
    stack = np.zeros_like(probs[level1[0]])
    for k in range(fold.max() + 1):
        meta = make_meta_learner(fold[fold != k]).fit(z[fold != k], y[fold != k])
        stack[fold == k] = meta.predict_proba(z[fold == k])
    final = make_meta_learner(fold).fit(z, y)
    write_oof(run.artifacts / f"oof_{SOFT_VOTE}.csv", run.table, soft_vote(probs, level1))
    write_oof(run.artifacts / f"oof_{STACK}.csv", run.table, stack)
    atomic_write_bytes(run.models / f"{STACK}.pkl", pickle.dumps(final))
    run.log(f"stack: meta-learner over {', '.join(level1)}, cross-validated on the shared folds and refit on all rows")
