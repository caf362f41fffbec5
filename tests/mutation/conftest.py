"""A manifest built by hand: every optional part that a check reads (two CNNs, an OOD score with its
image check, recorded choices, a training prior, a card), so that the checks can be tested in
milliseconds, without the tiny training run (tests/core/test_manifest_checks.py reads that one)."""

from __future__ import annotations

import copy

import pytest

from service.core import labels

HASH = "0" * 64


def cnn(name: str, file: str) -> dict:
    return {
        "name": name,
        "file": file,
        "libraries": ["onnxruntime"],
        "input_name": "image",
        "output_name": "probabilities",
        "members": 1,
        "architecture": "resnet18",
        "training_precision": "fp32",
        "explain_outputs": ["cam", "embedding", "logits"],
    }


def choice(chosen: str) -> dict:
    return {"chosen": chosen, "picked": chosen, "rule": "the rule", "scores": {}, "fold_picks": []}


MANIFEST = {
    "bundle_id": "b1",
    "created_at": "2026-12-08T00:00:00Z",
    "classes": labels.CLASSES,
    "class_names": labels.CLASS_NAMES,
    "malignant_classes": labels.MALIGNANT_CLASSES,
    "preprocessing": {"width": 8, "height": 8},
    "features": {"cnns": ["cnn", "cnn_b"], "classes": labels.CLASSES},
    "cnns": [cnn("cnn", "cnn.onnx"), cnn("cnn_b", "cnn_b.onnx")],
    "boosters": [{"name": "xgboost", "file": "xgboost.json", "libraries": ["xgboost"]}],
    "soft_vote": "soft_vote",
    "stack": {"name": "stack", "file": "stack.pkl", "libraries": ["scikit-learn"]},
    "served": "stack",
    "served_choice": choice("stack"),
    "lesion_rule": "log_mean",
    "lesion_rule_choice": choice("log_mean"),
    "training_images": "training_images.csv",
    "model_card": "MODEL_CARD.md",
    "ood": {
        "method": "energy",
        "thresholds": {"energy": 1.0},
        "flag_share": 0.05,
        "file": "ood.npz",
        "image_threshold": 2.0,
        "image_file": "ood_image.npz",
    },
    "training_prevalence": {c: 1 / len(labels.CLASSES) for c in labels.CLASSES},
    "files": {
        f: HASH
        for f in (
            "cnn.onnx",
            "cnn_b.onnx",
            "xgboost.json",
            "stack.pkl",
            "training_images.csv",
            "MODEL_CARD.md",
            "ood.npz",
            "ood_image.npz",
        )
    },
    "library_versions": {"onnxruntime": "1.32.0", "xgboost": "3.2.0", "scikit-learn": "1.9.1"},
}


@pytest.fixture
def manifest() -> dict:
    """A valid manifest as a dict, a fresh copy per test."""
    return copy.deepcopy(MANIFEST)
