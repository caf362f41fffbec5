"""The bundle's MODEL_CARD.md, generated from the run's report and settings (after Mitchell et al.,
"Model Cards for Model Reporting", 2019). Served at GET /model/card."""

from __future__ import annotations

import json
from pathlib import PurePath

from service.core import labels
from service.core.manifest import CnnModel, ModelFile
from training.reporting.markdown import (
    MALIGNANT_NOTE,
    lesion_lines,
    metrics_table,
    nested_row,
    selection_lines,
    served_tables,
    triage_lines,
)
from training.run import Run

SERVED_NAMES = {"stack": "the stacked meta-learner", "soft_vote": "the soft vote (the level-1 models' mean)"}


ARCH_NAMES = {"resnet18": "ResNet-18", "efficientnet_lite0": "EfficientNet-Lite0"}


def cnn_line(cnn: CnnModel) -> str:
    """One CNN in words: architecture, initial weights and their source, served precision."""
    sha = f" (sha256 `{cnn.weights_sha256[:16]}…`)" if cnn.weights_sha256 else ""
    return (
        f"- `{cnn.name}`: {ARCH_NAMES.get(cnn.architecture, cnn.architecture)}, initialised from "
        f"{cnn.weights_source or cnn.weights or 'an unrecorded source'}{sha}; served {cnn.precision}"
        + (", 8-view test-time augmentation" if cnn.tta else "")
    )


def model_card(run: Run, cnns: list[CnnModel], boosters: list[ModelFile]) -> str:
    report = json.loads(run.paths.report_json.read_text())
    data, cfg = report["data"], run.cfg
    synthetic = bool(data.get("synthetic"))
    counts = ", ".join(f"{c} {n}" for c, n in data["class_counts"].items())
    archs = " + ".join(ARCH_NAMES.get(c.architecture, c.architecture) for c in cnns)
    cnn = cnns[0]  # the lead: heatmaps and the OOD score
    lines = [f"# Model card: skin-lesion classifier ({archs} + boosters + soft vote and stacked meta-learner)", ""]
    if synthetic:
        lines += [
            "> **DEMO MODEL, trained on synthetic images.** It shows the plumbing; its answers say nothing about "
            "real lesions.",
            "",
        ]
    lines += [
        "## Intended use",
        "",
        "Research and decision support on **dermoscopy** images of pigmented skin lesions, for the seven "
        f"HAM10000 diagnoses ({', '.join(f'{c}: {n}' for c, n in labels.CLASS_NAMES.items())}). It is not a "
        "medical device and must not decide a diagnosis or a treatment on its own. It was not trained on clinical "
        "(non-dermoscopic) photographs, on other diagnoses, or on populations unlike its training data; answers for "
        "such inputs are unreliable, and the out-of-distribution flag catches only some of them.",
        "",
        "## Data",
        "",
        f"`{PurePath(data['data_dir']).name}`: {data['images']} images of {data['lesions']} lesions "
        f"({counts}). Folds: {data['folds']}, grouped by lesion, shared by every stage. "
        + (
            "Synthetic demo images."
            if synthetic
            else "HAM10000 comes from two sites (Vienna, Queensland) and mostly "
            "light skin types; its labels are histopathology for most malignant lesions and follow-up, expert "
            "consensus or confocal microscopy for the rest."
        ),
        "",
        "## Models",
        "",
        f"CNNs trained at {cfg.image_size}x{cfg.image_height} for {cfg.epochs} epochs (pretrained ones fine-tuned: "
        f"backbone at {cfg.backbone_lr_scale:g}x the head's learning rate, {cfg.freeze_stages} first stages frozen); "
        f"served: the {cfg.served_cnn} model of each"
        + (
            f" (it and the served boosters and meta-learner never trained on the {cfg.calibration_share:.0%} of lesions "
            "held out to measure the triage points)"
            if cfg.calibration_share > 0
            else ""
        )
        + ":",
        "",
        *map(cnn_line, cnns),
        "",
        f"Boosters on every CNN's probabilities, age, sex, site and colour statistics: {', '.join(b.name for b in boosters)}. "
        f"Served answer: {SERVED_NAMES.get(report['served'], report['served'])}. Every model is trained with "
        "balanced class weights.",
        "",
        *selection_lines(report),
        "",
        "## Cross-validated metrics (out-of-fold, 95% lesion-bootstrap intervals)",
        "",
        *metrics_table(report, nested_row(report)),
        "",
        MALIGNANT_NOTE,
        "",
        *[line.replace("## ", "### ") for line in lesion_lines(report)],
        "",
        *(
            [line.replace("## ", "### ") for line in triage_lines(report["triage"])] + [""]
            if "triage" in report
            else []
        ),
        *[line.replace("## ", "### ") for line in served_tables(report)],
        "",
        "## Probabilities",
        "",
        "As trained, probabilities are those of a population where the seven classes are equally common, which "
        "overstates rare (mostly malignant) classes for a typical clinic. A request may name `prior=training` (this "
        "data's class shares) or give its own prevalences; the table above shows log loss and ECE under both. "
        f"This bundle's default prior: **{cfg.prior}**.",
        "",
        "## Out-of-distribution flag and image checks",
        "",
        (
            f"Each answer carries an out-of-distribution score ({cfg.ood_method}, from the `{cnn.name}` CNN's embedding or "
            f"logits); its threshold flags {cfg.ood_share:.0%} of held-out real training images by design. "
            if cnn.has_ood_outputs
            else "This bundle's CNN graph has no embedding output, so its answers carry no out-of-distribution score. "
        )
        + "Cheap checks warn about low resolution, nearly uniform, blurred, too dark or too bright images.",
        "",
        "## Known limits",
        "",
        "- Small CNNs at low resolution, trained on a CPU budget on one public dataset: accuracy is below "
        "dermatologists' and the best ISIC models; see the metrics above.",
        "- Subgroups with few images have wide intervals; skin types and ages rare in HAM10000 are not measured.",
        "- Heatmaps are class activation maps at the CNN's last feature-map resolution (1/32 of the input): coarse, "
        "and they show what drove the CNN, not what is medically relevant.",
        "- Metadata attributions explain the boosters' answers (TreeSHAP), not the served combination itself.",
    ]
    return "\n".join(lines) + "\n"
