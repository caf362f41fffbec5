"""The model core on its own: metadata policy, manifest roster, imports, preprocessing."""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from service.core.bundle import BundleError, read_manifest
from service.core.features import FeatureSpec
from service.core.metadata import ClinicalMetadata, MetadataError, validate_metadata
from service.core.preprocess import load_for_model
from tests.helpers import BLOCK, REPO, sample_images
from training.config import ALL_BOOSTERS, CNN, SOFT_VOTE, STACK

SPEC = FeatureSpec()


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ClinicalMetadata()),
        ({}, ClinicalMetadata()),
        (
            {"age": 55, "sex": "Male", "site": "Lower_Extremity"},
            ClinicalMetadata(age=55, sex="male", site="lower extremity"),
        ),
        ({"age": "55"}, ClinicalMetadata(age=55)),
        ({"age": " 42.5 "}, ClinicalMetadata(age=42.5)),
        ({"age": 0}, ClinicalMetadata(age=0)),
        ({"age": None, "sex": "", "site": None}, ClinicalMetadata()),
        ({"age": " "}, ClinicalMetadata()),
        ({"localization": "back"}, ClinicalMetadata(site="back")),
        ({"site": "back", "localization": "back"}, ClinicalMetadata(site="back")),
        (ClinicalMetadata(age=3, sex="female"), ClinicalMetadata(age=3, sex="female")),
    ],
)
def test_metadata_coercion_policy_accepts(value, expected):
    assert validate_metadata(value, SPEC) == expected


@pytest.mark.parametrize(
    "value, words",
    [
        ({"age": True}, "not true/false"),
        ({"age": "fifty"}, "age"),
        ({"age": "1_0"}, "written in decimal"),  # float() reads it as 10
        ({"age": "0x1f"}, "written in decimal"),
        ({"age": "٥٠"}, "written in decimal"),  # Arabic-Indic digits (float() reads 50; pydantic refused them too)
        ({"age": float("nan")}, "age"),
        ({"age": float("inf")}, "age"),
        ({"age": 120.5}, "outside 0-120"),
        ({"sex": "other"}, "use one of: male, female, unknown"),
        ({"sex": ["male"]}, "must be a string"),
        ({"site": "elbow"}, "use one of"),
        ({"site": "back", "localization": "face"}, "both"),
        ({"weight": 80}, "unknown metadata field 'weight'; allowed fields: age, sex, site"),
        ([{"age": 5}], "must be a JSON object"),
        ("age=5", "must be a JSON object"),
    ],
)
def test_metadata_coercion_policy_refuses_with_a_message(value, words):
    with pytest.raises(MetadataError, match=re.escape(words)):
        validate_metadata(value, SPEC)


def test_offline_predictor_reports_bad_metadata_for_people(predictor):
    spec = predictor.manifest.preprocessing
    img = np.full((1, spec.height, spec.width, 3), 128, np.uint8)
    with pytest.raises(MetadataError, match="site 'elbow' is not allowed"):
        predictor.predict(img, [{"site": "elbow"}])
    with pytest.raises(MetadataError, match="sex 'robot'"):
        predictor.predict(img, [ClinicalMetadata(sex="robot")])
    (pred,) = predictor.predict(img, [{"localization": "back", "age": 40}])
    assert pred.served == predictor.manifest.served and pred.probabilities.sum() == pytest.approx(1)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["boosters"][0].update(file="evil.pkl"), "is not among the hashed files"),
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "is not a plain name"),
        (lambda m: m["files"].update({"..": "0" * 64}), "is not a plain name"),
        (lambda m: m["files"].update({"a\x00b": "0" * 64}), "is not a plain name"),
        (lambda m: m.update(served="nope"), "served model 'nope'"),
        (lambda m: m["boosters"].append(m["boosters"][0]), "model names repeat"),
        (lambda m: m.pop("stack"), "stack: Field required"),
        (lambda m: m.update(format_version=1), "format_version 1 is not supported"),
        (lambda m: m["cnns"][0].update(precision="int8", quantization=None), "needs a passed quantization gate"),
        (lambda m: m["cnns"][0].update(members=0), "greater than or equal to 1"),
        (lambda m: m["cnns"][0].update(precision="int8", fp32_file=m["cnns"][0]["file"]), "model files repeat"),
        (lambda m: m["cnns"][0].update(precision="int8", fp32_file=m["stack"]["file"]), "model files repeat"),
        (lambda m: m["cnns"][-1].update(precision="int8", quantization=None), "needs a passed quantization gate"),
        (lambda m: m["cnns"][-1].update(file=m["cnns"][0]["file"]), "model files repeat"),
        (lambda m: m["features"]["cnns"].reverse(), "differ from the CNNs"),
        (lambda m: m.update(cnns=[]), "at least 1 item"),
    ],
)
def test_the_manifest_roster_must_be_consistent(tiny_run, tmp_path, edit, words):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_run / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(words)):
        read_manifest(bundle)


def test_a_manifest_before_version_5_names_its_one_cnn(tiny_run, tmp_path):
    """Bundles written before several CNNs (format 4: one `cnn`, features without `cnns`) still load."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_run / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["features"]["cnns"] == [c["name"] for c in manifest["cnns"]] and len(manifest["cnns"]) == 2
    resnet = next(c for c in manifest.pop("cnns") if c["architecture"] == "resnet18")
    manifest.update(format_version=4, cnn=resnet)
    del manifest["features"]["cnns"]
    manifest["files"] = {f: h for f, h in manifest["files"].items() if not f.startswith("cnn_efficientnet_lite0")}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    old = read_manifest(bundle)
    assert [c.name for c in old.cnns] == ["cnn"] and old.cnn.architecture == "resnet18"
    assert old.level1[0] == "cnn" and old.features.names[0] == "cnn_p_akiec"


def test_core_imports_without_fastapi_or_torch():
    code = BLOCK.format(names=["torch", "torchvision", "fastapi", "starlette", "uvicorn"])
    code += "import service.core.predictor, service.core.bundle, service.core.metadata, service.core.features"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_api_does_not_import_torch():
    code = BLOCK.format(names=["torch", "torchvision"]) + "import service.api.app, service.__main__"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_demo_data_runs_without_torch_or_onnxruntime(tmp_path):
    code = BLOCK.format(names=["torch", "torchvision", "onnxruntime", "onnx"])
    code += f"from training.__main__ import main\nsys.exit(main(['demo-data', '--out', {str(tmp_path)!r}, '--images', '12']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "HAM10000_images_part_1").iterdir())) == 12


def string_literals(path) -> set[str]:
    """Every string constant of a Python file, f-string parts included."""
    return {
        n.value.strip().lower()
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_no_model_name_is_spelled_in_the_serving_code():
    """Model names (as keys, comparisons, defaults) come from the manifest only; prose may say "the CNN"."""
    names = {CNN, SOFT_VOTE, STACK, *ALL_BOOSTERS}
    py = sorted((REPO / "service").rglob("*.py"))
    assert len(py) > 10
    schema_keys = {"service/core/manifest.py": {CNN}}  # the field of the one CNN of manifests before version 5
    for path in py:
        spelled = string_literals(path) & names - schema_keys.get(path.relative_to(REPO).as_posix(), set())
        assert not spelled, f"{path.relative_to(REPO)} spells {spelled}"
    for path in (REPO / "service").rglob("*.html"):
        quoted = set(re.findall(r"[\"'`]([a-z_]+)[\"'`]", path.read_text().lower()))
        assert not quoted & names, f"{path.relative_to(REPO)} spells {quoted & names}"


def test_the_name_check_would_catch_a_spelled_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('probs["stack"] = 1\nname = f"{x}"\n')
    assert STACK in string_literals(bad)


def test_exif_orientation_is_applied_before_anything_else(sample_dir, predictor):
    spec = predictor.manifest.preprocessing
    big = Image.open(sample_images(sample_dir)[1]).resize((600, 450), Image.Resampling.BICUBIC)
    plain, rotated = io.BytesIO(), io.BytesIO()
    big.save(plain, "JPEG", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90° back
    big.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", quality=92, exif=exif)
    upright, reference = load_for_model(rotated.getvalue(), spec), load_for_model(plain.getvalue(), spec)
    assert upright.shape == reference.shape and np.abs(upright.astype(int) - reference.astype(int)).mean() < 12


def test_xgboost_cpu_counts_as_xgboost():
    """The serving extra installs xgboost-cpu (no NCCL); bundles name the library xgboost."""
    import xgboost

    from service.core.bundle import library_versions

    assert library_versions(["xgboost"])["xgboost"] == xgboost.__version__
    assert library_versions(["no-such-library"]) == {"no-such-library": "missing"}


def test_image_stats_are_each_channels_mean_and_std():
    """The boosters' image features (shared by training and serving) against numpy's own mean and std."""
    from service.core.features import image_stats

    rng = np.random.default_rng(0)
    images = np.concatenate([rng.integers(0, 256, (3, 24, 32, 3)), np.full((1, 24, 32, 3), 200)]).astype(np.uint8)
    x = images.reshape(len(images), -1, 3).astype(np.float64) / 255.0
    expected = np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)
    got = image_stats(images)
    assert got.dtype == np.float32 and got.shape == (4, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert (got[3, 3:] == 0).all()  # a uniform image: std exactly 0, never NaN
