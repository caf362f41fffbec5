"""Stage 4: XGBoost, LightGBM and CatBoost on OOF CNN probabilities + metadata + image colour stats.

For outer fold k a booster trains on the other folds only. Its number of rounds is chosen by
early stopping on one of those training folds (k+1), then it is refit on all of them; the
fold-k rows are never seen. Every row's features come from the CNN that never saw its lesion.
The served boosters are refit on every row with the mean chosen number of rounds.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_sample_weight
from tqdm import tqdm

from service import labels
from service.features import FeatureSpec, build_features, image_stats
from training.cnn import PROB_COLUMNS
from training.io import atomic_write, atomic_write_csv

BOOSTERS = ["xgboost", "lightgbm", "catboost"]
EARLY_STOP = 50


def make_booster(name: str, rounds: int, seed: int, early_stop: bool):
    n_classes = len(labels.CLASSES)
    if name == "xgboost":
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=rounds,
            learning_rate=0.05,
            max_depth=4,
            subsample=0.8,
            colsample_bytree=0.8,
            tree_method="hist",
            objective="multi:softprob",
            eval_metric="mlogloss",
            random_state=seed,
            n_jobs=2,
            early_stopping_rounds=EARLY_STOP if early_stop else None,
        )
    if name == "lightgbm":
        from lightgbm import LGBMClassifier

        return LGBMClassifier(
            n_estimators=rounds,
            learning_rate=0.05,
            num_leaves=15,
            subsample=0.8,
            subsample_freq=1,
            colsample_bytree=0.8,
            min_child_samples=20,
            random_state=seed,
            n_jobs=2,
            verbose=-1,
        )
    if name == "catboost":
        from catboost import CatBoostClassifier

        return CatBoostClassifier(
            iterations=rounds,
            learning_rate=0.08,
            depth=5,
            loss_function="MultiClass",
            classes_count=n_classes,
            random_seed=seed,
            thread_count=2,
            verbose=False,
            allow_writing_files=False,
            early_stopping_rounds=EARLY_STOP if early_stop else None,
        )
    raise ValueError(name)


def best_rounds(name: str, model) -> int:
    if name == "xgboost":
        return int(model.best_iteration) + 1
    if name == "lightgbm":
        return int(model.best_iteration_ or model.n_estimators)
    return int(model.get_best_iteration()) + 1


def fit(name: str, model, x, y, eval_set=None):
    """Balanced sample weights, like the CNN's weighted loss: all models aim at BMCA."""
    w = compute_sample_weight("balanced", y)
    if eval_set is None:
        return model.fit(x, y, sample_weight=w)
    xv, yv = eval_set
    if name == "lightgbm":
        import lightgbm

        return model.fit(
            x,
            y,
            sample_weight=w,
            eval_X=(xv,),
            eval_y=(yv,),
            eval_sample_weight=[compute_sample_weight("balanced", yv)],
            callbacks=[lightgbm.early_stopping(EARLY_STOP, verbose=False)],
        )
    if name == "xgboost":
        return model.fit(
            x,
            y,
            sample_weight=w,
            eval_set=[(xv, yv)],
            sample_weight_eval_set=[compute_sample_weight("balanced", yv)],
            verbose=False,
        )
    return model.fit(x, y, sample_weight=w, eval_set=(xv, yv))


def feature_matrix(run) -> np.ndarray:
    """The boosters' training input: OOF CNN probabilities through the service's feature code."""
    cnn_probs = run.oof("cnn")[PROB_COLUMNS].to_numpy()
    return build_features(cnn_probs, run.dataset.metadata(), image_stats(run.images), FeatureSpec())


def cross_fit(
    name: str, x: np.ndarray, y: np.ndarray, fold: np.ndarray, rounds: int, seed: int
) -> tuple[np.ndarray, list[int]]:
    n_folds = fold.max() + 1
    oof = np.zeros((len(y), len(labels.CLASSES)))
    chosen = []
    for k in tqdm(range(n_folds), desc=name, leave=False, disable=None):
        inner = (k + 1) % n_folds
        fit_rows, stop_rows = (fold != k) & (fold != inner), fold == inner
        probe = fit(
            name, make_booster(name, rounds, seed, True), x[fit_rows], y[fit_rows], (x[stop_rows], y[stop_rows])
        )
        chosen.append(best_rounds(name, probe))
        model = fit(name, make_booster(name, chosen[-1], seed, False), x[fold != k], y[fold != k])
        oof[fold == k] = model.predict_proba(x[fold == k])
    return oof, chosen


def run_boosters(run) -> None:
    x = feature_matrix(run)
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    for name in BOOSTERS:
        oof_path, model_path = run.artifacts / f"oof_{name}.csv", run.dir / "models" / f"{name}.pkl"
        if oof_path.exists() and model_path.exists():
            run.log(f"{name}: already done, skipping")
            continue
        oof, chosen = cross_fit(name, x, y, fold, run.cfg.booster_rounds, run.cfg.seed)
        final = fit(name, make_booster(name, int(np.mean(chosen)), run.cfg.seed, False), x, y)
        table = pd.concat(
            [run.table[["image_id", "fold"]].reset_index(drop=True), pd.DataFrame(oof, columns=PROB_COLUMNS)], axis=1
        )
        atomic_write_csv(oof_path, table)
        atomic_write(model_path, lambda p, model=final: p.write_bytes(pickle.dumps(model)))
        run.log(f"{name}: rounds per fold {chosen}, final model {int(np.mean(chosen))} rounds")
