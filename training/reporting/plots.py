"""The report's plots, drawn with matplotlib's object API (no pyplot, so no backend to choose)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from service.core import labels
from training.data.io import atomic_write


def figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def save_png(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def plot_roc(y, probs, title, path) -> None:
    fig, ax = figure(figsize=(5, 5))
    for i, c in enumerate(labels.CLASSES):
        fpr, tpr, _ = roc_curve(y == i, probs[:, i])
        ax.plot(fpr, tpr, label=c)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    save_png(fig, path)


def plot_confusion(y, probs, title, path) -> None:
    fig, ax = figure(figsize=(6, 5))
    ConfusionMatrixDisplay.from_predictions(
        y,
        probs.argmax(1),
        labels=range(len(labels.CLASSES)),
        display_labels=labels.CLASSES,
        normalize="true",
        values_format=".2f",
        ax=ax,
        colorbar=False,
    )
    ax.set_title(title)
    save_png(fig, path)


def plot_reliability(y, model_probs, path, title: str = "Reliability (out-of-fold)", n_bins: int = 10) -> None:
    fig, ax = figure(figsize=(5, 5))
    for name, p in model_probs.items():
        conf, correct = p.max(1), p.argmax(1) == y
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        xs = [conf[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ys = [correct[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ax.plot(xs, ys, "o-", label=name, ms=3)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", title=title)
    ax.legend()
    save_png(fig, path)
