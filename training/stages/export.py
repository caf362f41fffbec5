"""Stage 3, export: the served CNN in one ONNX graph and the out-of-distribution checks' thresholds.
(Its int8 graph is made by the quantize stage, which needs the level-2 models.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.run import Run


def outputs(run: Run) -> list[Path]:
    p = run.paths
    refit = [p.refit] if run.cfg.served_cnn == "refit" else []
    return [*refit, p.fp32_graph, p.ood_spec]


def run(run: Run) -> None:
    """The served CNN in one ONNX graph (the fold models averaged, or the refit model):
    cnn/cnn.onnx, parity-checked on real images, with the explanation outputs (CAM, embedding,
    logits). Its out-of-distribution thresholds, fitted out-of-fold: cnn/ood.json."""
    import torch

    from training.cnn.loop import load_fold_model, served_members, train_refit
    from training.cnn.onnx import export_onnx
    from training.cnn.ood import fit_ood
    from training.data.io import atomic_write

    if run.cfg.served_cnn == "refit" and not run.paths.refit.exists():  # trained here, once
        y = run.table.label.to_numpy()
        model = train_refit(run.cfg, run.images, y, np.arange(len(y)), run.log)
        atomic_write(run.paths.refit, lambda p: torch.save(model.state_dict(), p))
    served = served_members(run)
    rng = np.random.default_rng(run.cfg.seed)
    idx = np.sort(rng.choice(len(run.table), size=min(32, len(run.table)), replace=False))
    spec = run.cfg.image_spec()
    export_onnx(served, spec, run.images[idx], run.paths.fp32_graph, run.cfg.tta, log=run.log, explain=True)
    refit = run.cfg.served_cnn == "refit"
    folds = [load_fold_model(run.paths, k) for k in range(run.cfg.folds)] if refit else served
    fit_ood(run, folds, run.cfg.ood_method, run.cfg.ood_share)
