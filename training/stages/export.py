"""Stage 3, export: each served CNN in one ONNX graph. (The int8 graphs are made by the quantize
stage, which needs the level-2 models; the OOD thresholds by the baseline stage, through the
graphs the bundle serves.)"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from training.run import Run


def outputs(run: Run) -> list[Path]:
    cnns = [run.paths.cnn(name) for name in run.cfg.cnns]
    refit = [c.refit for c in cnns] if run.cfg.served_cnn == "refit" else []
    return [*refit, *(c.fp32_graph for c in cnns)]


def save_state(model: Any, path: Path) -> None:
    import torch

    torch.save(model.state_dict(), path)


def run(run: Run) -> None:
    """Each served CNN in one ONNX graph (the fold models averaged, or the model refit on every row
    but the calibration lesions):
    <cnn>/<cnn>.onnx, parity-checked on real images, with the explanation outputs (CAM, embedding,
    logits)."""
    from training.cnn.loop import served_members, train_refit
    from training.cnn.onnx import export_onnx
    from training.data.io import atomic_write

    y = run.table.label.to_numpy()
    rng = np.random.default_rng(run.cfg.seed)
    idx = np.sort(rng.choice(len(run.table), size=min(32, len(run.table)), replace=False))
    for arch, name in zip(run.cfg.arch, run.cfg.cnns):
        paths = run.paths.cnn(name)
        trained = run.cfg.served_cnn == "refit" and not paths.refit.exists()
        if trained:  # trained here, once
            refit = train_refit(run.cfg, arch, run.images, y, np.flatnonzero(run.refit_rows), run.log)
            atomic_write(paths.refit, functools.partial(save_state, refit))
        if trained or not paths.fp32_graph.exists():
            served = served_members(run, arch)
            export_onnx(served, run.cfg.image_spec(), run.images[idx], paths.fp32_graph, run.cfg.tta, run.log, True)
