"""The served model's out-of-fold figures beyond the overall table: per class, per subgroup
(sex, age band, anatomical site) and under a stated class prior, each with lesion-bootstrap
95% intervals. report.json carries them; the bundle's MODEL_CARD.md shows them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss, roc_auc_score

from service.core import labels
from service.core.priors import adjust
from training.evaluation.metrics import MALIGNANT_IDX, _ci, ece, isic_pauc, lesion_bootstrap_weights, malignant_score

AGE_BANDS = [(0, 30, "<30"), (30, 50, "30-49"), (50, 70, "50-69"), (70, 200, "70+")]
MIN_SUBGROUP = 20  # images; smaller subgroups are listed with their count only


def bootstrapped(fn: Callable[[np.ndarray | None], dict[str, float]], lesions, n_boot: int, seed: int) -> dict:
    """fn(row weights or None) -> {name: value}; returns {name: {value, ci95}} over lesion resamples."""
    point = fn(None)
    reps = [fn(w) for w in lesion_bootstrap_weights(lesions, n_boot, seed)]
    return {k: {"value": v, "ci95": _ci([r[k] for r in reps])} for k, v in point.items()}


def per_class_metrics(y: np.ndarray, probs: np.ndarray, w: np.ndarray | None) -> dict[str, float]:
    w = np.ones(len(y)) if w is None else w
    pred, out = probs.argmax(1), {}
    for i, c in enumerate(labels.CLASSES):
        pos, called = (y == i), (pred == i)
        out[f"{c}.recall"] = float(w[pos & called].sum() / w[pos].sum()) if w[pos].sum() else np.nan
        out[f"{c}.precision"] = float(w[pos & called].sum() / w[called].sum()) if w[called].sum() else np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            both = w[pos].sum() > 0 and w[~pos].sum() > 0
            out[f"{c}.auc"] = float(roc_auc_score(pos, probs[:, i], sample_weight=w)) if both else np.nan
    return out


def subgroup_metrics(y: np.ndarray, probs: np.ndarray, w: np.ndarray | None) -> dict[str, float]:
    """BMCA over the classes present, and the malignant AUC and pAUC when both kinds are present."""
    w = np.ones(len(y)) if w is None else w
    present = [i for i in range(len(labels.CLASSES)) if w[y == i].sum() > 0]
    pred = probs.argmax(1)
    recalls = [w[(y == i) & (pred == i)].sum() / w[y == i].sum() for i in present]
    malignant = np.isin(y, MALIGNANT_IDX)
    out = {"bmca": float(np.mean(recalls)) if recalls else np.nan, "malignant_auc": np.nan, "malignant_pauc": np.nan}
    if w[malignant].sum() > 0 and w[~malignant].sum() > 0:
        score = malignant_score(probs)
        out["malignant_auc"] = float(roc_auc_score(malignant, score, sample_weight=w))
        out["malignant_pauc"] = isic_pauc(malignant.astype(int), score, sample_weight=w)
    return out


def subgroup_masks(table: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    age = table.age.to_numpy(dtype=float)
    bands = {name: (age >= lo) & (age < hi) for lo, hi, name in AGE_BANDS}
    bands["unknown"] = np.isnan(age)
    return {
        "sex": {s: (table.sex == s).to_numpy() for s in sorted(table.sex.unique())},
        "age": bands,
        "site": {s: (table.localization == s).to_numpy() for s in sorted(table.localization.unique())},
    }


def subgroups(table: pd.DataFrame, y, probs, n_boot: int, seed: int) -> dict:
    out: dict[str, dict] = {}
    lesions = table.lesion_id.to_numpy()
    for kind, masks in subgroup_masks(table).items():
        out[kind] = {}
        for name, m in masks.items():
            if not m.any():
                continue
            row: dict[str, Any] = {"images": int(m.sum()), "lesions": int(pd.unique(lesions[m]).size)}
            if m.sum() >= MIN_SUBGROUP:
                row["metrics"] = bootstrapped(partial(subgroup_metrics, y[m], probs[m]), lesions[m], n_boot, seed)
            out[kind][name] = row
    return out


def fit_temperature(probs: np.ndarray, y: np.ndarray, prior: np.ndarray) -> float:
    """The temperature minimising log loss of `adjust(probs, prior, T)` on these rows."""
    n = len(labels.CLASSES)
    res = minimize_scalar(
        lambda t: log_loss(y, adjust(probs, prior, float(np.exp(t))), labels=range(n)),
        bounds=(-1.5, 1.5),
        method="bounded",
    )
    return float(np.exp(res.x))


def class_shares(y: np.ndarray) -> np.ndarray:
    counts = np.bincount(y, minlength=len(labels.CLASSES)).astype(float)
    return np.maximum(counts, 0.5) / np.maximum(counts, 0.5).sum()  # a class absent from the rows stays possible


def calibration(y: np.ndarray, probs: np.ndarray, fold: np.ndarray) -> dict:
    """The served model's log loss and ECE out-of-fold: as trained (balanced prior), moved to the
    training data's class shares, and with a temperature as well. The shares and the temperature
    applied to fold k are fitted on the other folds only. The temperature is adopted (the bundle
    applies it) only if it lowers both log loss and ECE under the training prior."""
    n = len(labels.CLASSES)
    shifted, tempered, temps = np.zeros_like(probs), np.zeros_like(probs), []
    for k in np.unique(fold):
        rest, this = fold != k, fold == k
        prior = class_shares(y[rest])
        temps.append(fit_temperature(probs[rest], y[rest], prior))
        shifted[this] = adjust(probs[this], prior)
        tempered[this] = adjust(probs[this], prior, temps[-1])

    def figures(p: np.ndarray) -> dict[str, float]:
        return {"log_loss": float(log_loss(y, p, labels=range(n))), "ece": ece(y, p)}

    out: dict[str, Any] = {
        "balanced": figures(probs),
        "training_prior": figures(shifted),
        "training_prior_tempered": figures(tempered),
    }
    better = all(out["training_prior_tempered"][k] < out["training_prior"][k] for k in ("log_loss", "ece"))
    out["fold_temperatures"] = temps
    out["temperature"] = fit_temperature(probs, y, class_shares(y)) if better else 1.0
    out["temperature_adopted"] = better
    out["training_prevalence"] = dict(zip(labels.CLASSES, class_shares(y).tolist()))
    return out


def served_figures(table: pd.DataFrame, y, probs, n_boot: int, seed: int) -> dict:
    """What report.json adds for the served model."""
    lesions = table.lesion_id.to_numpy()
    return {
        "per_class": bootstrapped(lambda w: per_class_metrics(y, probs, w), lesions, n_boot, seed),
        "subgroups": subgroups(table, y, probs, min(n_boot, 200), seed),
        "calibration": calibration(y, probs, table.fold.to_numpy()),
    }
