"""The manifest's checks, each on both sides of its line, on a manifest built by hand (conftest.py).

tests/core/test_manifest_checks.py breaks the manifest that training writes, one fault per concern;
these cases add the other side of each check (what it must still allow) and the boundary cases, so
that a check made stricter or looser fails a test. They run in milliseconds: `make mutants` uses them.
"""

from __future__ import annotations

import pytest

from service.core.manifest import Manifest, QuantizationAttempt, TrainingSummary, libraries_of, without_paths
from tests.helpers import first_error

PASSED_GATE = {"passed": True, "images": 10, "agreement": 1.0}
HASH = "0" * 64


def test_the_hand_built_manifest_is_valid(manifest):
    assert first_error(manifest) == ""
    m = Manifest.model_validate(manifest)
    assert m.cnn.name == "cnn" and m.level1 == ["cnn", "cnn_b", "xgboost"]
    assert m.components == ["cnn", "cnn_b", "xgboost", "soft_vote", "stack"]
    assert m.required_libraries == ["onnxruntime", "scikit-learn", "xgboost"]
    assert m.model_file_names == ["cnn.onnx", "cnn_b.onnx", "xgboost.json", "stack.pkl"]
    assert sorted(m.listed_files) == sorted(manifest["files"])


# --- classes -------------------------------------------------------------------------------------


def test_the_encoder_must_read_the_manifests_classes_and_cnns(manifest):
    manifest["features"]["cnns"] = ["cnn_b", "cnn"]
    assert "features.cnns ['cnn_b', 'cnn'] differ from the CNNs ['cnn', 'cnn_b']" in first_error(manifest)


def test_the_encoder_must_read_the_manifests_classes_in_order(manifest):
    manifest["features"]["classes"] = manifest["classes"][::-1]
    assert "features.classes ['vasc', 'nv', 'mel', 'df', 'bkl', 'bcc', 'akiec'] differ from classes" in first_error(
        manifest
    )


def test_malignant_classes_must_be_classes(manifest):
    manifest["malignant_classes"] = ["mel", "melanoma"]
    assert "malignant_classes ['mel', 'melanoma'] are not all among ['akiec'," in first_error(manifest)


def test_every_class_needs_a_name_and_extra_names_are_allowed(manifest):
    manifest["class_names"].pop("vasc")
    assert "class_names lacks ['vasc']" in first_error(manifest)
    manifest["class_names"] |= {"vasc": "Vascular lesion", "other": "not a class"}
    assert first_error(manifest) == ""


@pytest.mark.parametrize("malignant", [[], ["mel"], "all"])
def test_any_subset_of_the_classes_may_be_malignant(manifest, malignant):
    manifest["malignant_classes"] = list(manifest["classes"]) if malignant == "all" else malignant
    assert first_error(manifest) == ""


# --- training prevalence -------------------------------------------------------------------------


def test_no_training_prevalence_is_allowed(manifest):
    manifest["training_prevalence"] = {}
    assert first_error(manifest) == ""


def test_a_prevalence_for_a_class_not_in_the_manifest_is_refused(manifest):
    manifest["training_prevalence"]["other"] = 0.0
    assert "training_prevalence must give a share for every class, and only for those" in first_error(manifest)


@pytest.mark.parametrize(
    "shares, ok",
    [
        ({"nv": 0.0, "mel": 2 / 7}, False),  # a share of 0 is not a positive share
        ({"nv": -1 / 7, "mel": 3 / 7}, False),
        ({"nv": 1.0, **{c: 1e-4 for c in ("akiec", "bcc", "bkl", "df", "mel", "vasc")}}, True),  # 1.0006: within 1e-3
        ({"nv": 1.0 + 1 / 7}, False),  # over 1 (and the sum is off)
        ({"nv": 1.0005, **{c: 5e-5 for c in ("akiec", "bcc", "bkl", "df", "mel", "vasc")}}, False),  # over 1
        ({"nv": 1 / 7 + 0.0009}, True),  # the sum 1.0009: within 1e-3
        ({"nv": 1 / 7 + 0.0011}, False),  # the sum 1.0011
        ({"nv": 1 / 7 - 0.0011}, False),  # the sum 0.9989
        ({"nv": 1 / 7 + 0.5}, False),
    ],
)
def test_prevalence_values_are_positive_shares_summing_to_one(manifest, shares, ok):
    manifest["training_prevalence"] |= shares
    error = first_error(manifest)
    assert error == "" if ok else "training_prevalence values must be positive shares summing to 1" in error


# --- roster --------------------------------------------------------------------------------------


def test_model_names_must_not_repeat(manifest):
    manifest["boosters"][0]["name"] = "cnn_b"
    assert "model names repeat: ['cnn', 'cnn_b', 'cnn_b', 'soft_vote', 'stack']" in first_error(manifest)


@pytest.mark.parametrize("served", ["cnn", "cnn_b", "xgboost", "soft_vote", "stack"])
def test_any_component_may_be_served(manifest, served):
    manifest["served"] = served
    manifest["served_choice"]["chosen"] = served
    assert first_error(manifest) == ""


def test_the_served_model_must_be_a_component(manifest):
    manifest["served"] = manifest["served_choice"]["chosen"] = "lightgbm"
    assert "served model 'lightgbm' is not one of ['cnn', 'cnn_b', 'xgboost', 'soft_vote', 'stack']" in first_error(
        manifest
    )


def test_a_served_choice_must_name_the_served_model_and_is_optional(manifest):
    manifest["served_choice"]["chosen"] = "soft_vote"
    assert "served_choice chose 'soft_vote', but 'stack' is served" in first_error(manifest)
    manifest.pop("served_choice")
    assert first_error(manifest) == ""


def test_a_lesion_rule_choice_must_name_the_lesion_rule_and_is_optional(manifest):
    manifest["lesion_rule_choice"]["chosen"] = "mean"
    assert "lesion_rule_choice chose 'mean', not 'log_mean'" in first_error(manifest)
    manifest.pop("lesion_rule_choice")
    assert first_error(manifest) == ""


# --- file names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\x00b", "manifest.json", "manifest.sig"])
def test_a_hashed_file_must_be_a_plain_name_inside_the_bundle(manifest, name):
    manifest["files"][name] = HASH
    assert f"file name {name!r} is not a plain name inside the bundle" in first_error(manifest)


@pytest.mark.parametrize("name", ["...", ".hidden", "a.b.c", "manifest.json.bak", "XGBoost.json"])
def test_plain_names_with_dots_pass_the_name_check(manifest, name):
    """A plain name passes the name check; it is then refused only as a file no model uses."""
    manifest["files"][name] = HASH
    assert f"hashed files [{name!r}] belong to no model" in first_error(manifest)


# --- hashed and used files -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model_card", "training_images"])
def test_every_named_file_needs_a_hash(manifest, key):
    manifest["files"].pop(manifest[key])
    assert f"bundle file {manifest[key]!r} is not among the hashed files" in first_error(manifest)


@pytest.mark.parametrize("key", ["file", "image_file"])
def test_the_ood_fits_need_a_hash(manifest, key):
    manifest["files"].pop(manifest["ood"][key])
    assert f"bundle file {manifest['ood'][key]!r} is not among the hashed files" in first_error(manifest)


def test_without_an_ood_score_its_files_are_not_named(manifest):
    manifest.pop("ood")
    for f in ("ood.npz", "ood_image.npz"):
        manifest["files"].pop(f)
    assert first_error(manifest) == ""
    manifest["files"]["ood.npz"] = HASH
    assert "hashed files ['ood.npz'] belong to no model" in first_error(manifest)


def test_a_model_file_needs_a_hash(manifest):
    manifest["files"].pop("stack.pkl")
    assert "bundle file 'stack.pkl' is not among the hashed files" in first_error(manifest)


# --- fp32 graph beside int8, distinct files, the int8 gate ----------------------------------------


def test_an_fp32_graph_is_only_kept_beside_an_int8_one(manifest):
    manifest["files"]["cnn_b.fp32.onnx"] = HASH
    manifest["cnns"][1]["fp32_file"] = "cnn_b.fp32.onnx"
    assert "a CNN's fp32_file is only for an int8 file" in first_error(manifest)
    manifest["cnns"][1] |= {"precision": "int8", "quantization": PASSED_GATE}
    assert first_error(manifest) == ""
    m = Manifest.model_validate(manifest)
    assert m.cnns[1].files == ["cnn_b.onnx", "cnn_b.fp32.onnx"] and m.cnns[0].files == ["cnn.onnx"]
    assert m.model_file_names == ["cnn.onnx", "cnn_b.onnx", "xgboost.json", "stack.pkl", "cnn_b.fp32.onnx"]


def test_an_fp32_graph_must_not_be_another_models_file(manifest):
    manifest["cnns"][1] |= {"precision": "int8", "quantization": PASSED_GATE, "fp32_file": "cnn.onnx"}
    assert "model files repeat: ['cnn.onnx', 'cnn_b.onnx', 'xgboost.json', 'stack.pkl', 'cnn.onnx']" in first_error(
        manifest
    )


@pytest.mark.parametrize("gate", [None, PASSED_GATE | {"passed": False}])
def test_an_int8_cnn_needs_a_passed_gate(manifest, gate):
    manifest["cnns"][1] |= {"precision": "int8", "quantization": gate}
    assert "cnn_b: an int8 file needs a passed quantization gate in the manifest" in first_error(manifest)


def test_an_fp32_cnn_may_record_a_failed_gate(manifest):
    manifest["cnns"][0]["quantization"] = PASSED_GATE | {"passed": False}
    assert first_error(manifest) == ""


# --- prior, OOD outputs, libraries ---------------------------------------------------------------


def test_the_training_prior_needs_every_class_share(manifest):
    manifest["default_prior"] = "training"
    assert first_error(manifest) == ""
    manifest["training_prevalence"] = {}
    assert "default_prior training needs a training_prevalence for every class" in first_error(manifest)
    manifest["default_prior"] = "balanced"
    assert first_error(manifest) == ""


@pytest.mark.parametrize("outputs", [["cam", "embedding"], ["cam", "logits"], []])
def test_an_ood_score_needs_the_lead_cnns_embedding_and_logits(manifest, outputs):
    manifest["cnns"][0]["explain_outputs"] = outputs
    assert "an OOD score needs the CNN graph's embedding and logits outputs" in first_error(manifest)


def test_only_the_lead_cnn_needs_the_ood_outputs_and_none_without_an_ood_score(manifest):
    manifest["cnns"][1]["explain_outputs"] = []
    assert first_error(manifest) == ""
    manifest["cnns"][0]["explain_outputs"] = ["embedding", "logits"]
    m = Manifest.model_validate(manifest)
    assert m.cnn.has_ood_outputs and not m.cnn.can_explain and not m.cnns[1].has_ood_outputs
    manifest["cnns"][0]["explain_outputs"] = []
    manifest.pop("ood")
    for f in ("ood.npz", "ood_image.npz"):
        manifest["files"].pop(f)
    assert first_error(manifest) == ""


def test_every_library_a_model_needs_has_its_version(manifest):
    manifest["library_versions"].pop("xgboost")
    assert "library_versions lacks ['xgboost']" in first_error(manifest)
    manifest["library_versions"] = {"xgboost": "3", "onnxruntime": "1", "scikit-learn": "1", "extra": "0"}
    assert first_error(manifest) == ""


def test_libraries_of_lists_each_library_once_sorted(manifest):
    m = Manifest.model_validate(manifest)
    assert libraries_of([m.stack, m.cnn, m.cnns[1]]) == ["onnxruntime", "scikit-learn"]
    assert libraries_of([]) == []


# --- older manifests -----------------------------------------------------------------------------


def test_a_manifest_before_version_5_names_its_one_cnn(manifest):
    old = {k: v for k, v in manifest.items() if k != "cnns"}
    old["cnn"] = manifest["cnns"][0]
    old["features"] = {k: v for k, v in manifest["features"].items() if k != "cnns"}
    old["files"] = {f: h for f, h in manifest["files"].items() if f != "cnn_b.onnx"}
    old["format_version"] = 4
    m = Manifest.model_validate(old)
    assert [c.name for c in m.cnns] == ["cnn"] and m.features.cnns == ["cnn"] and m.format_version == 4


def old_form(manifest: dict) -> dict:
    old = {k: v for k, v in manifest.items() if k != "cnns"} | {"cnn": manifest["cnns"][0], "format_version": 4}
    old["features"] = {k: v for k, v in manifest["features"].items() if k != "cnns"}
    old["files"] = {f: h for f, h in manifest["files"].items() if f != "cnn_b.onnx"}
    return old


def test_an_old_manifests_encoder_is_read_as_written_when_it_names_its_cnns(manifest):
    old = old_form(manifest)
    old["features"]["cnns"] = ["cnn"]
    assert Manifest.model_validate(old).features.cnns == ["cnn"]
    old["features"]["cnns"] = ["another"]  # not rewritten to agree: refused
    assert "features.cnns ['another'] differ from the CNNs ['cnn']" in first_error(old)


@pytest.mark.parametrize("drop", ["features", "cnn name"])
def test_an_old_manifest_without_its_encoder_or_cnn_name_is_an_error_not_a_crash(manifest, drop):
    old = old_form(manifest)
    if drop == "features":
        old.pop("features")
    else:
        old["cnn"].pop("name")
    assert first_error(old).startswith("features: Field required" if drop == "features" else "cnns.0.name")


def test_a_version_5_manifest_keeps_its_cnns_and_encoder(manifest):
    """`cnn` beside `cnns` is not the old form: the CNNs and the encoder's CNN list are read as written."""
    m = Manifest.model_validate(manifest | {"cnn": manifest["cnns"][1]})
    assert [c.name for c in m.cnns] == ["cnn", "cnn_b"] and m.features.cnns == ["cnn", "cnn_b"]


# --- gate attempts and the training summary -------------------------------------------------------


def check(passed: bool) -> dict:
    return {"images": 10, "passed": passed, "metrics": {}, "cnn_agreement": 1.0, "answer_agreement": 1.0}


@pytest.mark.parametrize(
    "folds, refit, passed",
    [(True, None, True), (False, None, False), (True, True, True), (True, False, False), (False, True, False)],
)
def test_an_attempt_passes_when_its_folds_and_any_refit_pass(folds, refit, passed):
    attempt = {"config": "c", "fp32_nodes": [], "folds": check(folds), "refit": None if refit is None else check(refit)}
    assert QuantizationAttempt.model_validate(attempt).passed is passed


def test_without_paths_keeps_names_only_for_the_path_keys():
    summary = {
        "config": {"data_dir": "/srv/data/ham", "weights": "/home/me/w.pt", "out": "/srv/runs/x", "seed": 3},
        "data": {"data_dir": "relative/ham", "images": 10},
        "report": "artifacts/report.json",
        "note": "/kept/as/is",
    }
    expected = {
        "config": {"data_dir": "ham", "weights": "w.pt", "out": "/srv/runs/x", "seed": 3},
        "data": {"data_dir": "ham", "images": 10},
        "report": "artifacts/report.json",
        "note": "/kept/as/is",
    }
    assert without_paths(summary) == expected
    assert without_paths(TrainingSummary.model_validate(summary)) == expected
    assert without_paths({"config": {"weights": None, "data_dir": 3}}) == {"config": {"weights": None, "data_dir": 3}}
    assert without_paths(TrainingSummary()) == {}  # the keys as given: none added by the defaults
