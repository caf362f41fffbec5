"""External validation: a bundle scored on any labelled HAM10000-layout dataset, without a server.

`python -m training evaluate --bundle DIR --data-dir DIR --out DIR` is how a clinic checks a model
on its own images, per image and per lesion (its `lesion_id` column, combined by the bundle's rule). Each image goes through the service's own code (`service.core`: decoding, the
metadata features, the bundle's models through `Predictor`), and the result has the training
report's metrics, lesion-bootstrap intervals and plots. Images the bundle trained on (same
image_id, or another image of a lesion it trained on) are not external: they are named in the
output and left out of the figures unless `--include-overlap` keeps them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from service.core import labels
from service.core.bundle import read_verified
from service.core.lesions import combine_by_group, group_codes
from service.core.manifest import Manifest
from service.core.predictor import Predictor
from training.config import CNN
from training.data.ham10000 import decode_all, load_dataset
from training.data.io import PROB_COLUMNS, atomic_write_csv, atomic_write_text
from training.errors import DataError
from training.evaluation.lesions import lesion_gain, lesion_level
from training.evaluation.metrics import with_intervals
from training.evaluation.triage import check_lines, check_points
from training.reporting.markdown import MALIGNANT_NOTE, lesion_lines, machine_description, metrics_table
from training.reporting.plots import plot_confusion, plot_reliability, plot_roc


def training_overlap(predictor: Predictor, bundle: Path, table: pd.DataFrame) -> pd.Series | None:
    """Per row: True if the bundle trained on this image or on another image of its lesion.
    None when the bundle does not list its training images (bundles made before it did)."""
    name = predictor.manifest.training_images
    if name is None:
        return None
    seen = pd.read_csv(io.BytesIO(read_verified(bundle, predictor.manifest, name)), dtype=str)
    return table.image_id.str.upper().isin(set(seen.image_id.str.upper())) | table.lesion_id.isin(set(seen.lesion_id))


def predict_all(predictor: Predictor, table: pd.DataFrame, metadata: list, batch: int = 64) -> dict[str, np.ndarray]:
    """Every component's probabilities for every row, in batches, as the service computes them
    (images decoded by the service's `load_for_model`, as training decodes them)."""
    images = decode_all(list(table.path), predictor.manifest.preprocessing)
    out: dict[str, list[np.ndarray]] = {c: [] for c in predictor.manifest.components}
    for start in tqdm(range(0, len(table), batch), desc="scoring", unit="batch", leave=False, disable=None):
        batch_metadata = metadata[start : start + batch]
        for c, p in predictor.predict_components(images[start : start + batch], batch_metadata).items():
            out[c].append(p)
    return {c: np.concatenate(p) for c, p in out.items()}


def overlap_sentence(o: dict) -> str:
    if not o["checked"]:
        return "The bundle does not list its training images: overlap with them is unknown."
    if not o["images"]:
        return "None of these images or lesions were in the bundle's training data."
    where = "included in the figures" if o["included"] else "left out of the figures"
    return f"{o['images']} image(s) overlap the bundle's training data (same image or same lesion), {where}."


def triage_sections(report: dict) -> list[str]:
    if "triage" not in report:
        return []
    t = report["triage"]
    lines = check_lines("Triage operating points on these images (the bundle's thresholds)", t["images"]) + [""]
    if "lesions" in t:
        lines += check_lines("Triage operating points on these lesions", t["lesions"]) + [""]
    return lines


def markdown(report: dict) -> str:
    d = report["data"]
    return "\n".join(
        [
            f"# External validation of {report['bundle_id']}",
            "",
            f"Data: `{d['data_dir']}`, {d['images']} images of {d['lesions']} lesions scored "
            f"(served model: {report['served']}). Machine: {report['machine']}. "
            f"95% intervals: {report['n_bootstrap']} bootstrap resamples of lesions.",
            "",
            overlap_sentence(report["overlap"]),
            "",
            *(["**This bundle was trained on synthetic demo data.**", ""] if report["synthetic_bundle"] else []),
            *metrics_table(report),
            "",
            *lesion_lines(report),
            "",
            *triage_sections(report),
            MALIGNANT_NOTE,
            "",
            "![ROC](plots/roc_served.png) ![confusion](plots/confusion_served.png) ![reliability](plots/reliability.png)",
            "",
        ]
    )


def check_triage(
    probs: np.ndarray, malignant: np.ndarray, lesions: np.ndarray, m: Manifest, n_boot: int, seed: int
) -> dict:
    """Each triage point's threshold on these images (the served answer as trained) and on these
    lesions (their images combined by the bundle's rule), against what it promised."""
    assert m.triage is not None
    scores = labels.malignant_scores(probs, m.classes, m.malignant_classes)
    out = {"images": check_points(scores, malignant, lesions, m.triage.points, n_boot, seed)}
    if m.triage.lesion_points:
        ids, codes = group_codes(lesions)
        first = np.unique(codes, return_index=True)[1]
        combined = labels.malignant_scores(
            combine_by_group(probs, codes, m.lesion_rule), m.classes, m.malignant_classes
        )
        out["lesions"] = check_points(combined, malignant[first], np.asarray(ids), m.triage.lesion_points, n_boot, seed)
    return out


def evaluate_bundle(
    bundle: Path,
    data_dir: Path,
    out: Path,
    bootstrap: int = 1000,
    seed: int = 0,
    include_overlap: bool = False,
    log=print,
) -> dict:
    """Score `bundle` on `data_dir`; write OUT/report.{json,md}, OUT/predictions.csv and OUT/plots."""
    predictor = Predictor.load(bundle)
    m = predictor.manifest
    dataset = load_dataset(data_dir, log=log)
    table = dataset.table
    overlap = training_overlap(predictor, bundle, table)
    if overlap is None:
        log("warning: this bundle does not list its training images; overlap with this data cannot be checked")
    elif overlap.any():
        log(
            f"warning: {int(overlap.sum())} of {len(table)} images are training images of this bundle or images of "
            f"lesions it trained on (e.g. {', '.join(table.image_id[overlap].head(3))}); "
            + ("they are included (--include-overlap)" if include_overlap else "they are left out of the figures")
        )
    keep = np.ones(len(table), bool) if overlap is None or include_overlap else ~overlap.to_numpy()
    if not keep.any():
        raise DataError(f"{data_dir}: every image overlaps the bundle's training data; --include-overlap scores them")
    metadata = [md for md, k in zip(dataset.metadata(), keep) if k]
    table = table[keep].reset_index(drop=True)

    y = table.label.to_numpy()
    malignant = np.isin(y, [labels.CLASSES.index(c) for c in labels.MALIGNANT_CLASSES])
    if malignant.all() or not malignant.any():
        raise DataError(
            f"{data_dir}: the images to score are all {'malignant' if malignant.all() else 'benign'}; "
            "AUC and pAUC need both malignant (mel, bcc, akiec) and benign lesions"
        )
    probs = predict_all(predictor, table, metadata)
    lesions = table.lesion_id.to_numpy()
    report = with_intervals(y, probs, lesions, bootstrap, seed, paired=(m.served, CNN))
    report["lesion_level"] = lesion_level(y, lesions, probs, m.lesion_rule, bootstrap, seed, paired=(m.served, CNN))
    report["lesion_gain"] = lesion_gain(y, lesions, probs[m.served], m.lesion_rule, bootstrap, seed)
    if m.triage is not None:  # each operating point's promise, checked on this data
        report["triage"] = check_triage(probs[m.served], malignant, lesions, m, bootstrap, seed)
    report.update(
        bundle_id=m.bundle_id,
        served=m.served,
        machine=machine_description(),
        synthetic_bundle=m.synthetic_data,
        data={
            "data_dir": str(data_dir),
            "images": len(table),
            "lesions": int(table.lesion_id.nunique()),
            "skipped_missing_images": dataset.skipped,
            "class_counts": {c: int((y == i).sum()) for i, c in enumerate(labels.CLASSES)},
        },
        overlap={
            "checked": overlap is not None,
            "images": 0 if overlap is None else int(overlap.sum()),
            "included": include_overlap,
            "image_ids": [] if overlap is None else dataset.table.image_id[overlap].tolist(),
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    rows = table[["image_id", "lesion_id", "dx"]].copy()
    rows[PROB_COLUMNS] = probs[m.served]
    _, codes = group_codes(lesions)  # each row's lesion answer: the service's /predict/batch with lesion_ids
    rows[[f"lesion_{c}" for c in PROB_COLUMNS]] = combine_by_group(probs[m.served], codes, m.lesion_rule)[codes]
    atomic_write_csv(out / "predictions.csv", rows)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", markdown(report))
    plots = out / "plots"
    plot_roc(y, probs[m.served], f"ROC per class: {m.served}", plots / "roc_served.png")
    plot_confusion(y, probs[m.served], f"Confusion (row-normalised): {m.served}", plots / "confusion_served.png")
    plot_reliability(y, probs, plots / "reliability.png", title="Reliability (external data)")
    log((out / "report.md").read_text())
    return report
