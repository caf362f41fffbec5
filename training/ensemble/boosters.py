"""Stage 4: the chosen boosters (XGBoost, LightGBM, CatBoost) on OOF CNN probabilities + metadata +
image colour statistics.

For outer fold k a booster trains on the other folds only. Its number of rounds is chosen by
early stopping on one of those training folds (k+1), then it is refit on all of them; the
fold-k rows are never seen. Every row's features come from the CNN that never saw its lesion.
The served boosters are refit on every row but the calibration lesions, with the mean chosen
number of rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.utils.class_weight import compute_sample_weight
from tqdm import tqdm

from service.core import labels
from service.core.features import FeatureSpec, build_features, image_stats
from training.data.io import PROB_COLUMNS
from training.errors import DataError
from training.run import Run

EARLY_STOP = 50
SKLEARN_API = ("numpy", "scikit-learn")  # XGBoost's and LightGBM's classifiers are scikit-learn estimators
THREADS = 2


@dataclass(frozen=True)
class Booster:
    """One booster library: how to build it, fit it with an early-stopping set, and read its best round."""

    name: str
    libraries: tuple[str, ...]  # the distributions its pickle needs at serving time
    make: Callable[[int, int, bool], Any]  # (rounds, seed, early_stop) -> estimator
    fit_early_stopping: Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any]
    best_rounds: Callable[[Any], int]


def balanced(y: np.ndarray) -> np.ndarray:
    """Balanced sample weights, like the CNN's weighted loss: all models aim at BMCA."""
    return compute_sample_weight("balanced", y)


def training_device() -> str:
    """'cuda' when training sees a GPU (as the CNN does), else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def xgboost_device() -> str:
    """XGBoost trains on the GPU when there is one and this build has CUDA (the xgboost-cpu
    distribution this project installs has not: install `xgboost` on a GPU training machine)."""
    import xgboost

    return "cuda" if training_device() == "cuda" and xgboost.build_info().get("USE_CUDA") else "cpu"


def for_serving(model):
    """A model trained on a GPU predicts on the CPU in the service (no device-mismatch warnings)."""
    if "device" in model.get_params():
        model.set_params(device="cpu")
    return model


def make_xgboost(rounds: int, seed: int, early_stop: bool):
    from xgboost import XGBClassifier

    return XGBClassifier(
        n_estimators=rounds,
        learning_rate=0.05,
        max_depth=4,
        subsample=0.8,
        colsample_bytree=0.8,
        tree_method="hist",
        device=xgboost_device(),
        objective="multi:softprob",
        eval_metric="mlogloss",
        random_state=seed,
        n_jobs=THREADS,
        early_stopping_rounds=EARLY_STOP if early_stop else None,
    )


def make_lightgbm(rounds: int, seed: int, early_stop: bool):
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
        n_jobs=THREADS,
        verbose=-1,
    )


def make_catboost(rounds: int, seed: int, early_stop: bool):
    from catboost import CatBoostClassifier

    return CatBoostClassifier(
        iterations=rounds,
        learning_rate=0.08,
        depth=5,
        loss_function="MultiClass",
        classes_count=len(labels.CLASSES),
        random_seed=seed,
        thread_count=THREADS,
        task_type="GPU" if training_device() == "cuda" else "CPU",
        verbose=False,
        allow_writing_files=False,
        early_stopping_rounds=EARLY_STOP if early_stop else None,
    )


def fit_xgboost(model, x, y, w, xv, yv):
    return model.fit(x, y, sample_weight=w, eval_set=[(xv, yv)], sample_weight_eval_set=[balanced(yv)], verbose=False)


def fit_lightgbm(model, x, y, w, xv, yv):
    import lightgbm

    stop = lightgbm.early_stopping(EARLY_STOP, verbose=False)
    return model.fit(
        x, y, sample_weight=w, eval_X=(xv,), eval_y=(yv,), eval_sample_weight=[balanced(yv)], callbacks=[stop]
    )


def fit_catboost(model, x, y, w, xv, yv):
    return model.fit(x, y, sample_weight=w, eval_set=(xv, yv))


BOOSTERS: dict[str, Booster] = {
    b.name: b
    for b in (
        Booster("xgboost", SKLEARN_API + ("xgboost",), make_xgboost, fit_xgboost, lambda m: int(m.best_iteration) + 1),
        Booster(
            "lightgbm",
            SKLEARN_API + ("lightgbm",),
            make_lightgbm,
            fit_lightgbm,
            lambda m: int(m.best_iteration_ or m.n_estimators),
        ),
        Booster(
            "catboost", ("numpy", "catboost"), make_catboost, fit_catboost, lambda m: int(m.get_best_iteration()) + 1
        ),
    )
}


def feature_spec(run: Run) -> FeatureSpec:
    """The run's feature encoder: its CNNs' probabilities, then metadata and colour statistics."""
    return FeatureSpec(cnns=run.cfg.cnns)


def oof_cnn_probs(run: Run) -> dict[str, np.ndarray]:
    """Every CNN's out-of-fold probabilities, by name."""
    return {name: run.oof(name)[PROB_COLUMNS].to_numpy() for name in run.cfg.cnns}


def feature_matrix(
    run: Run, cnn_probs: Mapping[str, np.ndarray] | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """The boosters' input for `rows` (row indices; default: every row) through the service's feature
    code: the CNNs' out-of-fold probabilities (the training input), or the given ones for those rows
    (the int8 gate's, the served graphs')."""
    pick = np.arange(len(run.table)) if rows is None else np.asarray(rows)
    if cnn_probs is None:
        cnn_probs = {name: p[pick] for name, p in oof_cnn_probs(run).items()}
    meta = run.dataset.metadata()
    images = run.images if rows is None else run.images[pick]  # no copy of every image
    return build_features(cnn_probs, [meta[i] for i in pick], image_stats(images), feature_spec(run))


def inner_split(fold: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For outer fold k: the rows a booster is fitted on (all folds but k and the next one) and the
    rows that choose its number of rounds (the next fold)."""
    inner = (k + 1) % (fold.max() + 1)
    return (fold != k) & (fold != inner), fold == inner


def check_every_class_trains(y: np.ndarray, fold: np.ndarray) -> None:
    """Each booster fits on all folds but an outer and an inner one, and needs every class there
    (XGBoost refuses labels that skip a class). Say so plainly when a class is too rare for that."""
    n_folds = fold.max() + 1
    for k in range(n_folds):
        fit_rows, _ = inner_split(fold, k)
        missing = [c for i, c in enumerate(labels.CLASSES) if not (y[fit_rows] == i).any()]
        if missing:
            counts = ", ".join(f"{c}: {(y == labels.CLASSES.index(c)).sum()} images" for c in missing)
            raise DataError(
                f"the boosters need every class in every training split, and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing from one ({counts} in the whole dataset, "
                f"{n_folds} folds): add images of "
                "those classes or use fewer --folds"
            )


def cross_fit(
    b: Booster, x: np.ndarray, y: np.ndarray, fold: np.ndarray, rounds: int, seed: int
) -> tuple[np.ndarray, list[int], list[Any]]:
    """Out-of-fold probabilities, the rounds chosen per fold, and the fold models."""
    n_folds = fold.max() + 1
    oof = np.zeros((len(y), len(labels.CLASSES)))
    chosen, models = [], []
    for k in tqdm(range(n_folds), desc=b.name, leave=False, disable=None):
        fit_rows, stop_rows = inner_split(fold, k)
        xf, yf = x[fit_rows], y[fit_rows]
        probe = b.fit_early_stopping(b.make(rounds, seed, True), xf, yf, balanced(yf), x[stop_rows], y[stop_rows])
        chosen.append(b.best_rounds(probe))
        model = b.make(chosen[-1], seed, False).fit(x[fold != k], y[fold != k], sample_weight=balanced(y[fold != k]))
        oof[fold == k] = model.predict_proba(x[fold == k])
        models.append(for_serving(model))
    return oof, chosen, models
