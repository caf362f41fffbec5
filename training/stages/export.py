"""Stage 3, export: the served CNN in one ONNX graph, the out-of-distribution checks' thresholds
and the int8 graph with its gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.run import Run


def outputs(run: Run) -> list[Path]:
    p = run.paths
    refit = [p.refit] if run.cfg.served_cnn == "refit" else []
    return [*refit, p.fp32_graph, p.ood_spec] + ([p.int8_graph, p.quantization] if run.cfg.int8 else [])


def run(run: Run) -> None:
    """The served CNN in one ONNX graph (the fold models averaged, or the refit model):
    cnn/cnn.onnx, parity-checked on real images, with the explanation outputs (CAM, embedding,
    logits). Its out-of-distribution thresholds, fitted out-of-fold: cnn/ood.json. With int8 on,
    also cnn/cnn.int8.onnx and the gate measured on the fold models' out-of-fold images,
    cnn/quantization.json."""
    import torch

    from training.cnn.loop import load_fold_model, served_members, train_refit
    from training.cnn.onnx import export_onnx
    from training.cnn.ood import fit_ood
    from training.data.io import atomic_write, atomic_write_text

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
    if run.cfg.int8:
        from training.cnn.quantize import quantize_ensemble, quantize_refit

        out = run.paths.int8_graph
        y, fold = run.table.label.to_numpy(), run.table.fold.to_numpy()
        # the fold models are always gated; their joined int8 graph is only written when it is served
        gate = quantize_ensemble(
            folds, run.images, y, fold, spec, None if refit else out, run.cfg.seed, run.cfg.tta, run.log
        )
        if refit:
            gate = quantize_refit(gate, run.paths.fp32_graph, run.images, spec, out, run.cfg.seed)
            run.log(f"int8: refit model vs its fp32 graph, top-1 agreement {gate.served_agreement:.4f}")
        atomic_write_text(run.paths.quantization, gate.model_dump_json(indent=2))
