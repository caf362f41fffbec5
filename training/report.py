"""Stage 6: artifacts/report.json, report.md and plots, every number out-of-fold."""

from __future__ import annotations

import json
import os
import platform

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve  # noqa: E402

from service.core import labels  # noqa: E402
from training.cnn import training_throughput  # noqa: E402
from training.config import CNN, STACK  # noqa: E402
from training.io import PROB_COLUMNS, atomic_write, atomic_write_text  # noqa: E402
from training.metrics import with_intervals  # noqa: E402
from training.subgroups import MIN_SUBGROUP, served_figures  # noqa: E402

METRICS = ["bmca", "macro_auc", "malignant_pauc", "malignant_auc", "accuracy", "log_loss", "ece"]


def machine_description() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def fmt(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def metrics_table(report: dict) -> list[str]:
    """The models' metrics with intervals as markdown rows, and the paired difference if measured."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    if "paired_difference" in report:
        d = report["paired_difference"]
        lines += [
            "",
            f"Paired difference {d['models']}: "
            + ", ".join(f"{k} {fmt(d[k])}" for k in ("malignant_pauc", "bmca", "macro_auc")),
        ]
    return lines


MALIGNANT_NOTE = (
    "malignant = mel + bcc + akiec; malignant_pauc is the ISIC 2024 partial AUC above 80% TPR (range 0-0.2)."
)


def markdown(report: dict) -> str:
    lines = [
        "# Out-of-fold results",
        "",
        f"Data: `{report['data']['data_dir']}`, {report['data']['images']} images of {report['data']['lesions']} lesions, "
        f"{report['data']['folds']} lesion-grouped folds. Machine: {report['machine']}. "
        f"95% intervals: {report['n_bootstrap']} bootstrap resamples of lesions.",
        "",
        *metrics_table(report),
    ]
    served = report.get("served_cnn", "ensemble")
    tta = " (8 dihedral views averaged, in validation, out-of-fold predictions and the served graph)"
    lines += [
        "",
        f"The CNN row is the fold models' out-of-fold predictions{tta if report['config'].get('tta') else ''}; "
        f"the bundle serves the {served} CNN.",
    ]
    gate = report.get("int8_gate")
    if gate:
        lines += [
            "",
            f"int8 gate {'passed' if gate['passed'] else 'failed (fp32 served)'}: top-1 agreement with fp32 "
            f"{gate['agreement']:.4f} (>= {gate['min_agreement']}) on {gate['images']} out-of-fold images; malignant "
            f"AUC {gate['fp32']['malignant_auc']:.4f} -> {gate['int8']['malignant_auc']:.4f}, pAUC "
            f"{gate['fp32']['malignant_pauc']:.4f} -> {gate['int8']['malignant_pauc']:.4f} "
            f"(max drop {gate['max_metric_drop']}).",
        ]
    if "per_class" in report:
        lines += ["", *served_tables(report)]
    lines += [
        "",
        MALIGNANT_NOTE,
        "",
        "![ROC](plots/roc_stack.png) ![confusion](plots/confusion_stack.png) ![reliability](plots/reliability.png)",
    ]
    return "\n".join(lines) + "\n"


def served_tables(report: dict) -> list[str]:
    """Per class, calibration under two priors, and per subgroup: the served model, out-of-fold."""
    served, pc = report["served"], report["per_class"]
    lines = [f"## The served model ({served}) per class", "", "| class | recall | precision | AUC (one vs rest) |"]
    lines.append("|---|---|---|---|")
    for c in labels.CLASSES:
        lines.append(
            f"| {c} ({labels.CLASS_NAMES[c]}) | "
            + " | ".join(fmt(pc[f"{c}.{k}"]) for k in ("recall", "precision", "auc"))
            + " |"
        )
    cal = report["calibration"]
    lines += [
        "",
        "## Probabilities under a stated class prior",
        "",
        "| prior | log loss | ECE |",
        "|---|---|---|",
        f"| balanced (as trained) | {cal['balanced']['log_loss']:.3f} | {cal['balanced']['ece']:.3f} |",
        f"| training data's class shares | {cal['training_prior']['log_loss']:.3f} | {cal['training_prior']['ece']:.3f} |",
        f"| training shares + temperature | {cal['training_prior_tempered']['log_loss']:.3f} | "
        f"{cal['training_prior_tempered']['ece']:.3f} |",
        "",
        "Shares and temperature applied to each fold were fitted on the other folds. Temperature "
        + (
            f"adopted: T = {cal['temperature']:.3f}."
            if cal["temperature_adopted"]
            else "not adopted (it did not lower both log loss and ECE)."
        ),
        "",
        f"## The served model ({served}) per subgroup",
        "",
        "| subgroup | images | lesions | BMCA | malignant AUC | malignant pAUC |",
        "|---|---|---|---|---|---|",
    ]
    for kind, groups in report["subgroups"].items():
        for name, g in groups.items():
            m = g.get("metrics")
            cells = [
                fmt(m[k]) if m and not np.isnan(m[k]["value"]) else "-"
                for k in ("bmca", "malignant_auc", "malignant_pauc")
            ]
            lines.append(f"| {kind}: {name} | {g['images']} | {g['lesions']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Subgroups under {MIN_SUBGROUP} images show counts only; '-': not measurable there (one kind of lesion).",
    ]
    return lines


def save_png(fig, path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_roc(y, probs, title, path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, c in enumerate(labels.CLASSES):
        fpr, tpr, _ = roc_curve(y == i, probs[:, i])
        ax.plot(fpr, tpr, label=c)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    save_png(fig, path)


def plot_confusion(y, probs, title, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
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
    fig, ax = plt.subplots(figsize=(5, 5))
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


def write_report(run) -> dict:
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
    report["cnn_train_images_per_s"] = training_throughput(run.dir, run.cfg.folds)
    report["served_cnn"] = run.cfg.served_cnn
    gate = run.dir / "cnn" / "quantization.json"
    report["int8_gate"] = json.loads(gate.read_text()) if run.cfg.int8 and gate.exists() else None
    report["served"] = STACK
    report.update(served_figures(run.table, y, model_probs[STACK], run.cfg.bootstrap, run.cfg.seed))
    atomic_write_text(run.artifacts / "report.json", json.dumps(report, indent=2))
    atomic_write_text(run.artifacts / "report.md", markdown(report))
    plots = run.artifacts / "plots"
    plot_roc(y, model_probs[STACK], "ROC per class: stack (OOF)", plots / "roc_stack.png")
    plot_roc(y, model_probs[CNN], "ROC per class: CNN (OOF)", plots / "roc_cnn.png")
    plot_confusion(y, model_probs[STACK], "Confusion (row-normalised): stack", plots / "confusion_stack.png")
    plot_reliability(y, model_probs, plots / "reliability.png")
    run.log((run.artifacts / "report.md").read_text())
    return report
