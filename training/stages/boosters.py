"""Stage 4, boosters: each chosen booster cross-fitted on the shared folds over the CNN's out-of-fold
probabilities, clinical metadata and colour statistics (service/core/features.py, as served);
its rounds picked on an inner fold; refit on every row but the calibration lesions. The fold models
are kept for the int8 gate."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from training.data.io import atomic_write_bytes, write_oof
from training.ensemble.boosters import (
    BOOSTERS,
    balanced,
    check_every_class_trains,
    cross_fit,
    feature_matrix,
    for_serving,
)
from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [p for m in run.cfg.boosters for p in booster_outputs(run, m)]


def booster_outputs(run: Run, name: str) -> list[Path]:
    folds = [run.paths.fold_level2(name, k) for k in range(run.cfg.folds)]
    return [run.paths.oof(name), run.paths.model(name), *folds]


def run(run: Run) -> None:
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    check_every_class_trains(y, fold)
    x = feature_matrix(run)
    for name in run.cfg.boosters:
        b = BOOSTERS[name]
        if all(p.exists() for p in booster_outputs(run, name)):
            run.log(f"{name}: already done, skipping")
            continue
        oof, chosen, fold_models = cross_fit(b, x, y, fold, run.cfg.booster_rounds, run.cfg.seed)
        refit = run.refit_rows
        final = b.make(int(np.mean(chosen)), run.cfg.seed, False).fit(
            x[refit], y[refit], sample_weight=balanced(y[refit])
        )
        for k, model in enumerate(fold_models):
            atomic_write_bytes(run.paths.fold_level2(name, k), pickle.dumps(model))
        write_oof(run.paths.oof(name), run.table, oof)
        atomic_write_bytes(run.paths.model(name), pickle.dumps(for_serving(final)))
        run.log(f"{name}: rounds per fold {chosen}, final model {int(np.mean(chosen))} rounds")
