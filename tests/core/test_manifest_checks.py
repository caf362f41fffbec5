"""The manifest's checks, concern by concern, on the manifest today's training writes (the tiny run's).

Each case breaks one thing of a valid manifest and expects that concern's message as the first error,
which is the one line `read_manifest` reports. Cases already in tests/core/test_core.py (roster, file
names, hashed files, int8 without a gate, repeated files) and tests/api/test_hostile.py (class names,
prevalence values) are not repeated here, but for one fault per concern that the order test needs.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from service.core.bundle import read_manifest
from service.core.manifest import Manifest, TrainingSummary, without_paths
from tests.helpers import first_error

PASSED_GATE = {"passed": True, "images": 10, "agreement": 1.0}


@pytest.fixture(scope="module")
def written(tiny_run) -> dict:
    """The tiny run's manifest.json, as training wrote it (a fresh copy per use: see `manifest`)."""
    return json.loads((tiny_run / "bundle" / "manifest.json").read_text())


@pytest.fixture
def manifest(written) -> dict:
    return copy.deepcopy(written)


def an_fp32_cnn(m: dict) -> dict:
    return next(c for c in m["cnns"] if c.get("precision", "fp32") == "fp32")


def hash_a_file(m: dict, name: str) -> None:
    m["files"][name] = "0" * 64


# Each concern's own faults, in the order the checks run. A fault's edit leaves every earlier check passing.
FAULTS = [
    ("classes", lambda m: m["features"].update(classes=m["classes"][::-1]), "features.classes"),
    ("classes", lambda m: m.update(malignant_classes=["melanoma"]), "malignant_classes ['melanoma'] are not all among"),
    (
        "prevalence",
        lambda m: m["training_prevalence"].pop(m["classes"][0]),
        "training_prevalence must give a share for every class, and only for those",
    ),
    ("roster", lambda m: m["served_choice"].update(chosen="another"), "served_choice chose 'another', but"),
    (
        "roster",
        lambda m: m["lesion_rule_choice"].update(chosen="mean" if m["lesion_rule"] != "mean" else "log_mean"),
        "lesion_rule_choice chose",
    ),
    ("plain names", lambda m: hash_a_file(m, "manifest.sig"), "file name 'manifest.sig' is not a plain name"),
    ("plain names", lambda m: hash_a_file(m, "a\\b.pkl"), "is not a plain name inside the bundle"),
    ("hashed", lambda m: m["files"].pop(m["training_images"]), "bundle file 'training_images.csv' is not among"),
    ("hashed", lambda m: m["files"].pop(m["ood"]["file"]), "is not among the hashed files"),
    (
        "fp32 file",
        lambda m: (hash_a_file(m, "extra.onnx"), an_fp32_cnn(m).update(fp32_file="extra.onnx")),
        "a CNN's fp32_file is only for an int8 file",
    ),
    ("distinct files", lambda m: m["cnns"][1].update(file=m["cnns"][0]["file"]), "model files repeat"),
    (
        "int8 gate",
        lambda m: m["cnns"][0].update(precision="int8", quantization=PASSED_GATE | {"passed": False}),
        "an int8 file needs a passed quantization gate in the manifest",
    ),
    ("unused", lambda m: hash_a_file(m, "extra.onnx"), "hashed files ['extra.onnx'] belong to no model"),
    (
        "prior",
        lambda m: m.update(default_prior="training", training_prevalence={}),
        "default_prior training needs a training_prevalence for every class",
    ),
    ("ood", lambda m: m["cnns"][0].update(explain_outputs=[]), "an OOD score needs the CNN graph's embedding"),
    ("libraries", lambda m: m["library_versions"].clear(), "library_versions lacks"),
]


def test_the_tiny_manifest_has_what_the_faults_break(written):
    """The cases below need an OOD score, recorded choices and a training prior on an fp32 bundle."""
    assert written["ood"] and written["served_choice"] and written["lesion_rule_choice"]
    assert written["training_prevalence"] and written["training_images"]
    assert all(c.get("precision", "fp32") == "fp32" for c in written["cnns"])
    assert first_error(written) == ""


@pytest.mark.parametrize("concern, edit, words", FAULTS, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(FAULTS)])
def test_each_check_refuses_its_own_fault(manifest, concern, edit, words):
    edit(manifest)
    assert words in first_error(manifest)


def test_the_checks_report_in_a_fixed_order(manifest):
    """Faults of two concerns: the earlier concern is the one reported (read_manifest names one fault)."""
    firsts = list({concern: (edit, words) for concern, edit, words in reversed(FAULTS)}.values())[::-1]
    assert len(firsts) == 12
    for (earlier, words), (later, later_words) in zip(firsts, firsts[1:]):
        both = copy.deepcopy(manifest)
        later(both)
        earlier(both)
        error = first_error(both)
        assert words in error and later_words not in error, (words, error)


def test_what_the_checks_allow(manifest):
    """Not over-strict: an int8 CNN with its passed gate and its fp32 graph, and the training prior."""
    cnn = manifest["cnns"][0]
    hash_a_file(manifest, "cnn.fp32.onnx")
    cnn.update(precision="int8", quantization=PASSED_GATE, fp32_file="cnn.fp32.onnx")
    manifest["default_prior"] = "training"
    assert first_error(manifest) == ""
    assert Manifest.model_validate(manifest).cnn.files == [cnn["file"], "cnn.fp32.onnx"]


@pytest.mark.parametrize("prior", ["uniform", "Balanced", "", None, 1])
def test_the_default_prior_is_a_named_prior(manifest, prior):
    manifest["default_prior"] = prior
    assert first_error(manifest).startswith("default_prior: Input should be 'balanced' or 'training'")


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda m: m["metrics"][m["served"]].update(bmca="high"), "metrics."),
        (lambda m: m["metrics"][m["served"]].update(bmca={"value": 0.5}), "metrics."),
        (lambda m: m.update(metrics={"stack": 0.5}), "metrics.stack"),
        (lambda m: m["metric_intervals"][m["served"]].update(bmca=0.5), "metric_intervals."),
        (lambda m: m["metric_intervals"][m["served"]].update(bmca=["low", "high"]), "metric_intervals."),
        (lambda m: m.update(training={"config": "fast"}), "training.config"),
        (lambda m: m.update(training={"report": ["report.json"]}), "training.report"),
    ],
)
def test_metrics_and_the_training_summary_are_typed(manifest, edit, where):
    edit(manifest)
    assert first_error(manifest).startswith(where)


def test_what_training_writes_is_what_the_types_hold(written):
    """model -> metric -> float, [low, high] intervals; a NaN of the report is written as null and read back."""
    m = Manifest.model_validate(written)
    assert set(m.metrics) == set(m.components) == set(m.metric_intervals)
    for model, figures in m.metrics.items():
        assert figures and all(isinstance(v, float) for v in figures.values())
        assert set(m.metric_intervals[model]) == set(figures)
        assert all(len(ci) == 2 for ci in m.metric_intervals[model].values())
    nan = copy.deepcopy(written)
    nan["metrics"][m.served]["macro_auc"] = float("nan")
    nan["metric_intervals"][m.served]["macro_auc"] = [float("nan"), float("nan")]
    dumped = json.loads(Manifest.model_validate(nan).model_dump_json())
    assert dumped["metrics"][m.served]["macro_auc"] is None
    assert dumped["metric_intervals"][m.served]["macro_auc"] == [None, None]
    assert first_error(dumped) == ""


def test_a_manifest_as_written_today_round_trips(tiny_run, tmp_path, written):
    """Read and written again, it is the same JSON: the typed fields keep every key and value."""
    m = read_manifest(tiny_run / "bundle")
    assert json.loads(m.model_dump_json()) == written
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    bundle = tmp_path / "b"
    shutil.copytree(tiny_run / "bundle", bundle)
    (bundle / "manifest.json").write_text(m.model_dump_json(indent=2))
    assert read_manifest(bundle) == m


def test_the_training_summary_is_served_as_written_less_paths(written):
    m = Manifest.model_validate(written)
    assert isinstance(m.training, TrainingSummary) and m.training.report == written["training"]["report"]
    assert without_paths(m.training) == without_paths(written["training"])
    assert set(without_paths(m.training)) == set(written["training"])
    odd = copy.deepcopy(written) | {"training": {"data": {"data_dir": "/srv/ham"}, "note": "kept"}}
    assert without_paths(Manifest.model_validate(odd).training) == {"data": {"data_dir": "ham"}, "note": "kept"}
    assert without_paths(Manifest.model_validate(written | {"training": {}}).training) == {}
    bare = {k: v for k, v in written.items() if k != "training"}
    assert without_paths(Manifest.model_validate(bare).training) == {}


@pytest.mark.parametrize("version", [2, 3, 4])
def test_an_older_manifest_without_the_newer_fields_loads(tiny_run, tmp_path, written, version):
    """A bundle before the OOD score, card, choices and priors: one `cnn`, the defaults for the rest."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_run / "bundle", bundle)
    old = copy.deepcopy(written)
    cnn, *others = old.pop("cnns")
    gone = [old["model_card"], old["training_images"], old["ood"]["file"], old["ood"]["image_file"]]
    gone += [f for c in others for f in (c["file"], c.get("fp32_file")) if f]
    for key in ("ood", "model_card", "training_images", "monitoring", "served_choice", "lesion_rule_choice"):
        old.pop(key)
    for key in ("default_prior", "training_prevalence", "temperature", "metric_intervals", "synthetic_data"):
        old.pop(key)
    del old["features"]["cnns"]
    cnn.pop("explain_outputs")
    old.update(format_version=version, cnn=cnn, lesion_rule="mean")
    old["files"] = {f: h for f, h in old["files"].items() if f not in gone}
    (bundle / "manifest.json").write_text(json.dumps(old))
    m = read_manifest(bundle)
    assert m.format_version == version and [c.name for c in m.cnns] == [cnn["name"]] and m.ood is None
    assert m.default_prior == "balanced" and m.metric_intervals == {} and m.metrics == written["metrics"]
