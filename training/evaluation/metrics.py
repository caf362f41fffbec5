"""Metrics: BMCA, macro AUC, accuracy, log loss, ECE, malignant AUC and the ISIC 2024 pAUC.

Bootstrap intervals resample lesions, not images (images of one lesion are not independent):
a replicate draws lesions with replacement and weights each row by its lesion's draw count.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    auc,
    balanced_accuracy_score,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from service.core import labels

MALIGNANT_IDX = [labels.CLASSES.index(c) for c in labels.MALIGNANT_CLASSES]


def isic_pauc(y_true: np.ndarray, score: np.ndarray, min_tpr: float = 0.80, sample_weight=None) -> float:
    """Partial AUC above `min_tpr`, range [0, 1 - min_tpr]: the official ISIC 2024 metric.

    As the challenge's scorer does, labels and scores are flipped so the region TPR >= min_tpr
    becomes FPR <= 1 - min_tpr, and the unstandardised area there is returned.
    """
    v_gt = 1 - np.asarray(y_true)
    v_pred = -np.asarray(score, dtype=np.float64)
    max_fpr = 1 - min_tpr
    fpr, tpr, _ = roc_curve(v_gt, v_pred, sample_weight=sample_weight)
    stop = np.searchsorted(fpr, max_fpr, "right")
    x_interp = [fpr[stop - 1], fpr[stop]]
    y_interp = [tpr[stop - 1], tpr[stop]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(auc(fpr, tpr))


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15, sample_weight=None) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins."""
    w = np.ones(len(y_true)) if sample_weight is None else np.asarray(sample_weight, float)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y_true).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total, err = w.sum(), 0.0
    for b in range(n_bins):
        m = bins == b
        wb = w[m].sum()
        if wb > 0:
            err += wb / total * abs(np.average(correct[m], weights=w[m]) - np.average(conf[m], weights=w[m]))
    return float(err)


def malignant_score(probs: np.ndarray) -> np.ndarray:
    return labels.malignant_scores(probs)


def all_metrics(y: np.ndarray, probs: np.ndarray, sample_weight=None) -> dict[str, float]:
    n = len(labels.CLASSES)
    probs = np.clip(probs, 1e-12, 1)
    probs = probs / probs.sum(1, keepdims=True)
    malignant = np.isin(y, MALIGNANT_IDX).astype(int)
    mal_score = malignant_score(probs)
    w = sample_weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        present = np.unique(y if w is None else y[np.asarray(w) > 0])
        macro = (
            roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(n), sample_weight=w)
            if len(present) == n
            else np.nan
        )
        return {
            "bmca": float(balanced_accuracy_score(y, probs.argmax(1), sample_weight=w)),
            "macro_auc": float(macro),
            "accuracy": float(accuracy_score(y, probs.argmax(1), sample_weight=w)),
            "log_loss": float(log_loss(y, probs, labels=range(n), sample_weight=w)),
            "ece": ece(y, probs, sample_weight=w),
            "malignant_auc": float(roc_auc_score(malignant, mal_score, sample_weight=w)),
            "malignant_pauc": isic_pauc(malignant, mal_score, sample_weight=w),
        }


def lesion_bootstrap_weights(lesion_ids: np.ndarray, n_boot: int, seed: int):
    """Yield row weights: each replicate draws lesions with replacement."""
    _, codes = np.unique(lesion_ids, return_inverse=True)
    n_lesions = codes.max() + 1
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, n_lesions, n_lesions), minlength=n_lesions)
        yield counts[codes].astype(float)


def with_intervals(
    y,
    model_probs: dict[str, np.ndarray],
    lesion_ids,
    n_boot: int,
    seed: int = 0,
    paired: tuple[str, str] = ("stack", "cnn"),
) -> dict:
    """Point estimates, 95% lesion-bootstrap intervals, and the paired difference a - b."""
    point = {m: all_metrics(y, p) for m, p in model_probs.items()}
    reps: dict[str, list[dict[str, float]]] = {m: [] for m in model_probs}
    for w in lesion_bootstrap_weights(lesion_ids, n_boot, seed):
        for m, p in model_probs.items():
            reps[m].append(all_metrics(y, p, w))
    out: dict[str, Any] = {"models": {}, "n_bootstrap": n_boot}
    for m in model_probs:
        out["models"][m] = {k: {"value": v, "ci95": _ci([r[k] for r in reps[m]])} for k, v in point[m].items()}
    a, b = paired
    if a in model_probs and b in model_probs:
        out["paired_difference"] = {
            "models": f"{a} - {b}",
            **{
                k: {
                    "value": point[a][k] - point[b][k],
                    "ci95": _ci([ra[k] - rb[k] for ra, rb in zip(reps[a], reps[b])]),
                }
                for k in ("malignant_pauc", "bmca", "macro_auc", "malignant_auc")
            },
        }
    return out


def _ci(values) -> list[float]:
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [np.nan, np.nan]
