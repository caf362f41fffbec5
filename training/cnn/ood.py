"""Part of the export stage: fit the out-of-distribution score (service.core.ood) and its thresholds.

Out-of-fold, as every figure of a run: fold model k embeds every image; its Gaussian is fitted on
the lesions it trained on and scores the lesions of fold k, which it never saw. The thresholds are
quantiles of those held-out scores, so by design they flag `share` of real images like the
training ones. The image-statistics check is fitted the same way (on each fold's training images,
scoring its held-out ones), and the two thresholds are set together, at one quantile, so that
either check together flags `share`. Writes cnn/ood.json (the OodSpec) and artifacts/oof_ood.csv
(image_id, fold, and each score held out).

The served CNN's own Gaussian is fitted when the bundle is written (`served_gaussian`), on its
training images (all of them, as each fold model's was on its own) and through the very graph
the bundle serves, int8 or fp32, so the service scores uploads exactly as it was fitted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.core import labels
from service.core.graph import EMBEDDING, INPUT_NAME
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
from training.cnn.batches import eval_batch
from training.cnn.models import FoldEnsemble
from training.data.io import atomic_write_csv, atomic_write_text
from training.run import Run

OOD_FILE, IMAGE_OOD_FILE = "ood.npz", "ood_image.npz"


@torch.no_grad()
def embed(members: list[nn.Module], images: np.ndarray, spec: ImageSpec, batch_size: int = 256):
    """(embeddings (N,512), logits (N,C)) of the image as given, averaged over `members`, float32
    evaluation transform: what the exported graph's 'embedding' and 'logits' outputs give."""
    net = FoldEnsemble([m.float().eval() for m in members], explain=True).eval()
    device = next(net.parameters()).device
    emb, logits = [], []
    for start in range(0, len(images), batch_size):
        _, _, e, z = net(eval_batch(images[start : start + batch_size], spec, device))
        emb.append(e.cpu().numpy())
        logits.append(z.cpu().numpy())
    return np.concatenate(emb), np.concatenate(logits)


def fit_ood(run: Run, fold_models: list[nn.Module], method: str, share: float) -> OodSpec:
    spec, images = run.cfg.image_spec(), run.images
    y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
    n_classes = len(labels.CLASSES)
    held_out = {m: np.zeros(len(y)) for m in [*METHODS, IMAGE_CHECK]}
    stats = image_statistics(images)
    for k, model in enumerate(fold_models):
        train, val = fold != k, fold == k
        emb, logits = embed([model], images, spec)
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
    )
    atomic_write_text(run.paths.ood_spec, ood.model_dump_json(indent=2))
    run.log(
        f"ood: {method} score and image statistics fitted; thresholds flagging {share:.0%} of held-out real "
        f"images together: {thresholds}, image {ood.image_threshold:.4g}"
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


def served_gaussian(
    graph: Path, images: np.ndarray, y: np.ndarray, spec: ImageSpec, batch_size: int = 256
) -> GaussianFit:
    """Class means and shared precision of the served graph's embeddings of the training images
    (onnxruntime, the service's own input transform)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    emb = [
        session.run([EMBEDDING], {INPUT_NAME: to_model_input(images[s : s + batch_size], spec)})[0]
        for s in range(0, len(images), batch_size)
    ]
    return fit_gaussian(np.concatenate(emb), y, len(labels.CLASSES))
