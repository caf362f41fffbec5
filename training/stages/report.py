"""Stage 7, report: artifacts/report.json, report.md and plots, every number out-of-fold (lesion-
bootstrap intervals; per class, per subgroup; log loss and ECE under two class priors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from service.core import labels
from training.config import CNN, STACK
from training.data.io import PROB_COLUMNS, atomic_write_text
from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.report_json, run.paths.report_md]


def training_throughput(run: Run) -> float:
    """Mean training images/s over every epoch of every fold, from the fold summaries."""
    rates = []
    for k in range(run.cfg.folds):
        rates += [h["train_images_per_s"] for h in json.loads(run.paths.fold_summary(k).read_text())["history"]]
    return float(np.mean(rates)) if rates else math.nan


def run(run: Run) -> None:
    from training.evaluation.metrics import with_intervals
    from training.evaluation.subgroups import served_figures
    from training.reporting.markdown import machine_description, markdown
    from training.reporting.plots import plot_confusion, plot_reliability, plot_roc

    y = run.table.label.to_numpy()
    model_probs = {m: run.oof(m)[PROB_COLUMNS].to_numpy() for m in run.cfg.components}
    report = with_intervals(
        y, model_probs, run.table.lesion_id.to_numpy(), run.cfg.bootstrap, run.cfg.seed, paired=(STACK, CNN)
    )
    report["data"] = {
        "data_dir": run.cfg.data_dir,
        "images": len(y),
        "lesions": int(run.table.lesion_id.nunique()),
        "skipped_missing_images": run.dataset.skipped,
        "synthetic": run.dataset.synthetic,
        "folds": run.cfg.folds,
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(labels.CLASSES)},
    }
    report["config"] = run.cfg.model_dump()
    report["machine"] = machine_description()
    report["cnn_train_images_per_s"] = training_throughput(run)
    report["served_cnn"] = run.cfg.served_cnn
    gate = run.paths.quantization
    report["int8_gate"] = json.loads(gate.read_text()) if run.cfg.int8 and gate.exists() else None
    report["served"] = STACK
    report.update(served_figures(run.table, y, model_probs[STACK], run.cfg.bootstrap, run.cfg.seed))
    atomic_write_text(run.paths.report_json, json.dumps(report, indent=2))
    atomic_write_text(run.paths.report_md, markdown(report))
    plots = run.paths.plots
    plot_roc(y, model_probs[STACK], "ROC per class: stack (OOF)", plots / "roc_stack.png")
    plot_roc(y, model_probs[CNN], "ROC per class: CNN (OOF)", plots / "roc_cnn.png")
    plot_confusion(y, model_probs[STACK], "Confusion (row-normalised): stack", plots / "confusion_stack.png")
    plot_reliability(y, model_probs, plots / "reliability.png")
    run.log(run.paths.report_md.read_text())
