"""The report's markdown: metrics with intervals, the served model's tables. Plain text, no torch."""

from __future__ import annotations

import math
import os
import platform

import numpy as np

from service.core import labels
from service.core.lesions import RULE_TEXT
from service.core.triage import TriageSpec
from training.evaluation.subgroups import MIN_SUBGROUP


def machine_description() -> str:
    """The machine, for a report: architecture, cores and GPU (torch is imported only here, when
    the report is written, so reading this module never loads it)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


METRICS = ["bmca", "macro_auc", "malignant_pauc", "malignant_auc", "accuracy", "log_loss", "ece"]


def fmt(m: dict) -> str:
    """A figure with its interval; '-' where the data gave none (a NaN, stored as null)."""
    value, (lo, hi) = m["value"], m["ci95"]
    if value is None or not math.isfinite(value):
        return "-"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def metrics_table(report: dict, extra: dict | None = None) -> list[str]:
    """The models' metrics with intervals as markdown rows (then `extra`'s rows), and the paired
    difference if measured."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in {**report["models"], **(extra or {})}.items():
        lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    if "paired_difference" in report:
        d = report["paired_difference"]
        lines += [
            "",
            f"Paired difference {d['models']}: "
            + ", ".join(f"{k} {fmt(d[k])}" for k in ("malignant_pauc", "bmca", "macro_auc")),
        ]
    return lines


def gate_lines(gate: dict) -> list[str]:
    """The int8 gate: its verdict, then each configuration tried and the served answer's figures."""
    if not gate.get("attempts"):  # a gate of an older run: top-1 agreement decided
        verdict = "passed" if gate["passed"] else "failed (fp32 served)"
        return [f"int8 gate {verdict}: top-1 agreement with fp32 {gate['agreement']:.4f} on {gate['images']} images."]
    verdict = f"passed with {gate['config']}" if gate["passed"] else "failed at every configuration (fp32 served)"
    lines = [
        f"int8 gate {verdict}. Rule: {gate['rule']}. Figures of the {gate['answer']} answer, fp32 -> int8 "
        "(relative change; 95% paired lesion-bootstrap interval of int8 - fp32):",
        "",
        "| configuration | checked on | " + " | ".join(gate["attempts"][0]["folds"]["metrics"]) + " | top-1 agreement "
        "CNN / answer | passed |",
        "|---|---|" + "---|" * len(gate["attempts"][0]["folds"]["metrics"]) + "---|---|",
    ]
    for a in gate["attempts"]:
        for where, check in (("out-of-fold images", a["folds"]), ("refit, its training images", a.get("refit"))):
            if not check:
                continue
            cells = [
                f"{m['fp32']:.4f} -> {m['int8']:.4f} ({-m['relative_loss']:+.2%}; "
                f"[{m['difference_ci95'][0]:+.4f}, {m['difference_ci95'][1]:+.4f}])"
                for m in check["metrics"].values()
            ]
            agree = f"{check['cnn_agreement']:.4f} / {check['answer_agreement']:.4f}"
            lines.append(
                f"| {a['config']} | {where} | "
                + " | ".join(cells)
                + f" | {agree} | {'yes' if check['passed'] else 'no'} |"
            )
    return lines


def selection_lines(report: dict) -> list[str]:
    """Which combiner is served and how a lesion's images combine, and why."""
    sel = report.get("selection")
    if not sel:
        return []
    c, r = sel["combiner"], sel["lesion_rule"]
    scores = ", ".join(f"{n} {s['malignant_pauc']:.4f} / {s['bmca']:.3f}" for n, s in c["scores"].items())
    why = (
        f"requested with `--served` (the rule picks {c['picked']})"
        if c.get("requested")
        else f"chosen by the rule fixed in advance: {c['rule']}"
    )
    return [
        f"Served combiner: **{c['chosen']}**, {why}. Out-of-fold malignant pAUC / BMCA: {scores}. "
        f"Picked without each outer fold: {', '.join(c['fold_picks'])}.",
        "",
        f"A lesion's images combine by **{r['chosen']}** ({RULE_TEXT[r['chosen']]}), by the same rule on lesions: "
        + ", ".join(f"{n} {s['malignant_pauc']:.4f} / {s['bmca']:.3f}" for n, s in r["scores"].items())
        + f"; picked without each outer fold: {', '.join(r['fold_picks'])}.",
    ]


def lesion_lines(report: dict) -> list[str]:
    """Lesion-level metrics of every model, the nested pipeline, and what combining gains."""
    lv = report.get("lesion_level")
    if not lv:
        return []
    nested = report.get("selection", {}).get("nested", {})
    extra = {"served, both choices nested": nested["lesions"]} if "lesions" in nested else None
    lines = [
        f"## Per lesion ({lv['lesions']} lesions, {lv['multi_image_lesions']} with several images; rule: {lv['rule']})",
        "",
        "Each lesion's images combined into one answer, as `/predict/batch` does with `lesion_ids`; one row per lesion.",
        "",
        *metrics_table(lv, extra),
    ]
    for name, g in report.get("lesion_gain", {}).items():
        d = g["paired_difference"]
        lines += [
            "",
            f"The served answer per lesion against per image, on the same {g['images']} images "
            f"({'all' if name == 'all_images' else 'of lesions with several images'}): "
            + ", ".join(
                f"{k} {g['models']['per_image'][k]['value']:.3f} -> {g['models']['per_lesion'][k]['value']:.3f} "
                f"(difference {fmt(d[k])})"
                for k in ("bmca", "malignant_auc", "malignant_pauc")
            )
            + ".",
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
        *metrics_table(report, nested_row(report)),
    ]
    served = report.get("served_cnn", "ensemble")
    tta = " (8 dihedral views averaged, in validation, out-of-fold predictions and the served graph)"
    lines += [
        "",
        f"Each CNN row is its fold models' out-of-fold predictions{tta if report['config'].get('tta') else ''}; "
        f"the bundle serves the {served} model of each.",
    ]
    if "selection" in report:
        lines += ["", *selection_lines(report)]
    for name, gate in report.get("int8_gates", {}).items():
        lines += ["", f"`{name}`: " + gate_lines(gate)[0], *gate_lines(gate)[1:]]
    if "triage" in report:
        lines += ["", *triage_lines(report["triage"])]
    if "lesion_level" in report:
        lines += ["", *lesion_lines(report)]
    if "per_class" in report:
        lines += ["", *served_tables(report)]
    lines += [
        "",
        MALIGNANT_NOTE,
        "",
        "![ROC](plots/roc_served.png) ![confusion](plots/confusion_served.png) ![reliability](plots/reliability.png)",
    ]
    return "\n".join(lines) + "\n"


def triage_lines(triage: dict) -> list[str]:
    """The triage operating points: what each promises (where it was measured: `measured_on`), with
    its threshold; per image and per lesion."""
    lines = [
        "## Triage operating points (refer when the malignant probability reaches the threshold)",
        "",
        "| answers | point | threshold | sensitivity | specificity | referred | PPV | NPV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, points in (("images", triage["points"]), ("lesions", triage.get("lesion_points", []))):
        for p in points:
            name = p["name"] + (" (default)" if p["name"] == triage["default"] else "")
            cells = " | ".join(fmt(p[k]) for k in ("sensitivity", "specificity", "referral_share", "ppv", "npv"))
            lines.append(f"| {level} | {name} | {p['threshold']:.4f} | {cells} |")
    spec = TriageSpec.model_validate(triage)  # its defaults for reports written before `source`, `measured_on`
    lines += [
        "",
        f"Measured on {spec.images} images of {spec.lesions} lesions, {spec.measured_on}: each fold was "
        "decided by the threshold chosen on the other folds' rows (nested); the served threshold is chosen on them "
        "all. Lesion points combine a lesion's images by the bundle's lesion rule, one row per lesion. PPV, NPV and "
        f"the referral share hold at the training data's prevalence. Score: {spec.basis}. An image with a "
        "quality or out-of-distribution warning is not triaged. Check the points on your own data with "
        "`python -m training evaluate` before relying on them.",
    ]
    if spec.source != "calibration":
        lines[-1] += (
            " Caveat: these are the fold models' figures; a bundle serving a CNN refit on every image can score on a "
            "wider scale (on the sample at the smoke preset, the 0.95 point reached 0.88 [0.83, 0.93] on lesions the "
            "run never saw)."
        )
    return lines


def nested_row(report: dict) -> dict | None:
    """The image-level row of the served pipeline with its choice nested in the outer folds."""
    nested = report.get("selection", {}).get("nested", {})
    return {"served, choice nested": nested["images"]} if "images" in nested else None


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
