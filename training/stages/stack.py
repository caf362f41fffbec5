"""Stage 5, stack: the soft vote and the meta-learner over the level-1 models' out-of-fold
probabilities, cross-validated on the same folds (training/ensemble/stacking.py); refit on every row but the
calibration lesions."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from service.core.features import soft_vote, stack_inputs
from training.config import SOFT_VOTE, STACK
from training.data.io import PROB_COLUMNS, atomic_write_bytes, write_oof
from training.ensemble.stacking import make_meta_learner
from training.run import Run


def outputs(run: Run) -> list[Path]:
    folds = [run.paths.fold_level2(STACK, k) for k in range(run.cfg.folds)]
    return [run.paths.oof(SOFT_VOTE), run.paths.oof(STACK), run.paths.model(STACK), *folds]


def run(run: Run) -> None:
    level1 = run.cfg.level1
    probs = {m: run.oof(m)[PROB_COLUMNS].to_numpy() for m in level1}
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    z = stack_inputs(probs, level1)
    stack = np.zeros_like(probs[level1[0]])
    for k in range(fold.max() + 1):
        meta = make_meta_learner(fold[fold != k]).fit(z[fold != k], y[fold != k])
        stack[fold == k] = meta.predict_proba(z[fold == k])
        atomic_write_bytes(run.paths.fold_level2(STACK, k), pickle.dumps(meta))
    refit = run.refit_rows
    final = make_meta_learner(fold[refit]).fit(z[refit], y[refit])
    write_oof(run.paths.oof(SOFT_VOTE), run.table, soft_vote(probs, level1))
    write_oof(run.paths.oof(STACK), run.table, stack)
    atomic_write_bytes(run.paths.model(STACK), pickle.dumps(final))
    run.log(
        f"stack: meta-learner over {', '.join(level1)}, cross-validated on the shared folds and refit on {refit.sum()} rows"
    )
