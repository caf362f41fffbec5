"""Stage 10, report: artifacts/report.json, report.md and plots, every number out-of-fold (lesion-
bootstrap intervals; per class, per subgroup; log loss and ECE under two class priors; per image and
per lesion; the served choice and the nested pipeline's figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from service.core import labels
from training.data.io import PROB_COLUMNS, atomic_write_text
from training.run import Run
from training.stages import select


def outputs(run: Run) -> list[Path]:
    return [run.paths.report_json, run.paths.report_md]


def training_throughput(run: Run, name: str) -> float:
    """A CNN's mean training images/s over every epoch of every fold, from the fold summaries."""
    rates = []
    for k in range(run.cfg.folds):
        summary = json.loads(run.paths.cnn(name).fold_summary(k).read_text())
        rates += [h["train_images_per_s"] for h in summary["history"]]
    return float(np.mean(rates)) if rates else math.nan


def run(run: Run) -> None:
    from training.ensemble.selection import lesion_rows
    from training.evaluation.lesions import lesion_gain, lesion_level
    from training.evaluation.metrics import with_intervals
    from training.evaluation.subgroups import served_figures
    from training.reporting.markdown import machine_description, markdown
    from training.reporting.plots import plot_confusion, plot_reliability, plot_roc

    y, lesions, fold = run.table.label.to_numpy(), run.table.lesion_id.to_numpy(), run.table.fold.to_numpy()
    n_boot, seed = run.cfg.bootstrap, run.cfg.seed
    model_probs = {m: run.oof(m)[PROB_COLUMNS].to_numpy() for m in run.cfg.components}
    chosen = select.saved_outcome(run, model_probs)
    served, rule = chosen.selection.combiner.chosen, chosen.selection.lesion_rule.chosen
    lead = run.cfg.cnns[0]
    report = with_intervals(y, model_probs, lesions, n_boot, seed, paired=(served, lead))
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
    report["cnn_train_images_per_s"] = {name: training_throughput(run, name) for name in run.cfg.cnns}
    report["served_cnn"] = run.cfg.served_cnn
    gates = {name: run.paths.cnn(name).quantization for name in run.cfg.cnns}
    report["int8_gates"] = {n: json.loads(g.read_text()) for n, g in gates.items() if run.cfg.int8 and g.exists()}
    report["served"] = served
    if run.paths.triage.exists():  # the operating points, measured on the graphs the bundle serves
        report["triage"] = json.loads(run.paths.triage.read_text())
    report["lesion_level"] = lesion_level(y, lesions, model_probs, rule, n_boot, seed, paired=(served, lead))
    report["lesion_gain"] = lesion_gain(y, lesions, model_probs[served], rule, n_boot, seed)
    ids, y_lesion, _ = lesion_rows(y, fold, lesions)
    report["selection"] = {
        **chosen.selection.model_dump(),
        "nested": {  # both choices made without each outer fold: the figures of choosing, out-of-fold
            "images": with_intervals(y, {"nested": chosen.nested_images}, lesions, n_boot, seed)["models"]["nested"],
            "lesions": with_intervals(y_lesion, {"nested": chosen.nested_lesions}, ids, n_boot, seed)["models"][
                "nested"
            ],
        },
    }
    report.update(served_figures(run.table, y, model_probs[served], n_boot, seed))
    atomic_write_text(run.paths.report_json, json.dumps(report, indent=2))
    atomic_write_text(run.paths.report_md, markdown(report))
    plots = run.paths.plots
    plot_roc(y, model_probs[served], f"ROC per class: {served} (OOF)", plots / "roc_served.png")
    for name in run.cfg.cnns:
        plot_roc(y, model_probs[name], f"ROC per class: {name} (OOF)", plots / f"roc_{name}.png")
    plot_confusion(y, model_probs[served], f"Confusion (row-normalised): {served}", plots / "confusion_served.png")
    plot_reliability(y, model_probs, plots / "reliability.png")
    run.log(run.paths.report_md.read_text())
