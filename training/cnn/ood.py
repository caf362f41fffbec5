"""Part of the baseline stage: fit the out-of-distribution score (service.core.ood) and its thresholds.

Out-of-fold, as every figure of a run, and through the graphs the bundle serves: the lead CNN's
fold model k, exported as the service runs it (int8 with its gate's configuration when the gate
passed, else fp32), embeds every image; its Gaussian is fitted on the lesions it trained on and
scores the lesions of fold k, which it never saw. The thresholds are quantiles of those held-out
scores, so by design they flag `share` of real images like the training ones, at the precision
served. The image-statistics check is fitted the same way (on each fold's training images, scoring
its held-out ones), and the two thresholds are set together, at one quantile, so that either check
together flags `share`. Writes artifacts/ood.json (the OodSpec) and artifacts/oof_ood.csv
(image_id, fold, and each score held out).

The served CNN's own Gaussian is fitted when the bundle is written (`served_gaussian`), on its
training images (all of them, as each fold model's was on its own) and through the very graph
the bundle serves, int8 or fp32, so the service scores uploads exactly as it was fitted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.core import labels
from service.core.graph import EMBEDDING, INPUT_NAME, LOGITS
from service.core.ood import (
    IMAGE_CHECK,
    METHODS,
    GaussianFit,
    OodSpec,
    energy,
    fit_gaussian,
    fit_image_gaussian,
    image_statistics,
    mahalanobis,
)
from service.core.preprocess import ImageSpec, to_model_input
from training.data.io import atomic_write_csv, atomic_write_text
from training.run import Run

OOD_FILE, IMAGE_OOD_FILE = "ood.npz", "ood_image.npz"


def graph_embeddings(graph: Path, images: np.ndarray, spec: ImageSpec, batch_size: int = 256):
    """(embeddings (N,D), logits (N,C)) of the images as given, through an exported graph with the
    explanation outputs (onnxruntime, the service's own input transform)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    out = [
        session.run([EMBEDDING, LOGITS], {INPUT_NAME: to_model_input(images[s : s + batch_size], spec)})
        for s in range(0, len(images), batch_size)
    ]
    return np.concatenate([e for e, _ in out]), np.concatenate([z for _, z in out])


def fit_ood(run: Run, fold_graphs: list[Path], method: str, share: float, fitted_on: str | None = None) -> OodSpec:
    """The thresholds from held-out scores: fold k's graph (`fold_graphs[k]`, described by
    `fitted_on`) scores fold k."""
    spec, images = run.cfg.image_spec(), run.images
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    n_classes = len(labels.CLASSES)
    held_out = {m: np.zeros(len(y)) for m in [*METHODS, IMAGE_CHECK]}
    stats = image_statistics(images)
    for k, graph in enumerate(fold_graphs):
        train, val = fold != k, fold == k
        emb, logits = graph_embeddings(graph, images, spec)
        held_out["mahalanobis"][val] = mahalanobis(emb[val], fit_gaussian(emb[train], y[train], n_classes))
        held_out["energy"][val] = energy(logits[val])
        held_out[IMAGE_CHECK][val] = mahalanobis(stats[val], fit_image_gaussian(stats[train]))
    q = joint_quantile(held_out[method], held_out[IMAGE_CHECK], share)
    thresholds = {m: float(np.quantile(held_out[m], q)) for m in METHODS}
    table = run.table[["image_id", "fold"]].reset_index(drop=True).assign(**held_out)
    atomic_write_csv(run.paths.oof("ood"), table)
    ood = OodSpec(  # the files are written into the bundle
        method=method,
        thresholds=thresholds,
        flag_share=share,
        file=OOD_FILE,
        image_threshold=float(np.quantile(held_out[IMAGE_CHECK], q)),
        image_file=IMAGE_OOD_FILE,
        fitted_on=fitted_on,
    )
    atomic_write_text(run.paths.ood_spec, ood.model_dump_json(indent=2))
    run.log(
        f"ood: {method} score and image statistics fitted through the {fitted_on}; thresholds flagging "
        f"{share:.0%} of held-out real images together: {thresholds}, image {ood.image_threshold:.4g}"
    )
    return ood


def joint_quantile(a: np.ndarray, b: np.ndarray, share: float) -> float:
    """The quantile q at which flagging a > quantile(a, q) or b > quantile(b, q) flags `share` of
    the rows (bisection: the share flagged falls as q rises)."""
    lo, hi = 1 - share, 1.0
    for _ in range(40):
        q = (lo + hi) / 2
        flagged = np.mean((a > np.quantile(a, q)) | (b > np.quantile(b, q)))
        lo, hi = (q, hi) if flagged > share else (lo, q)
    return hi


def served_gaussian(graph: Path, images: np.ndarray, y: np.ndarray, spec: ImageSpec) -> GaussianFit:
    """Class means and shared precision of the served graph's embeddings of the training images."""
    return fit_gaussian(graph_embeddings(graph, images, spec)[0], y, len(labels.CLASSES))
