"""Stage 4, boosters: each chosen booster cross-fitted on the shared folds over the CNN's out-of-fold
probabilities, clinical metadata and colour statistics (service/core/features.py, as served);
its rounds picked on an inner fold; refit on all rows."""

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
    return [p for m in run.cfg.boosters for p in (run.paths.oof(m), run.paths.model(m))]


def run(run: Run) -> None:
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    check_every_class_trains(y, fold)
    x = feature_matrix(run)
    for name in run.cfg.boosters:
        b = BOOSTERS[name]
        oof_path, model_path = run.paths.oof(name), run.paths.model(name)
        if oof_path.exists() and model_path.exists():
            run.log(f"{name}: already done, skipping")
            continue
        oof, chosen = cross_fit(b, x, y, fold, run.cfg.booster_rounds, run.cfg.seed)
        final = b.make(int(np.mean(chosen)), run.cfg.seed, False).fit(x, y, sample_weight=balanced(y))
        write_oof(oof_path, run.table, oof)
        atomic_write_bytes(model_path, pickle.dumps(for_serving(final)))
        run.log(f"{name}: rounds per fold {chosen}, final model {int(np.mean(chosen))} rounds")
