"""The int8 CNN: the joined graph, the out-of-fold gate, what the bundle serves, and the fp32 option."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from service.core.bundle import BundleError, read_manifest
from service.core.predictor import Predictor
from service.core.preprocess import ImageSpec, load_for_model, to_model_input
from tests.helpers import TINY, train
from training.cnn import quantize
from training.cnn.onnx import export_onnx


def test_joined_graph_is_the_mean_of_its_members(tmp_path):
    spec = ImageSpec(width=8, height=6)
    images = np.random.default_rng(0).integers(0, 255, (6, 6, 8, 3), dtype=np.uint8)
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 8, 7)) for _ in range(3)]
    paths = []
    for i, m in enumerate(members):
        paths.append(tmp_path / f"m{i}.onnx")
        export_onnx([m], spec, images, paths[-1], log=lambda msg: None)
    singles = [quantize.run_graph(quantize.session(p), images, spec) for p in paths]
    joined = quantize.session(quantize.join_members(paths).SerializeToString())
    assert np.allclose(quantize.run_graph(joined, images, spec), np.mean(singles, axis=0), atol=1e-6)


def oof_like(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 7
    logits = rng.normal(size=(n, 7)) + 3 * np.eye(7)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_gate_passes_identical_predictions():
    y, p = oof_like()
    gate = quantize.gate_figures(y, p, p.copy())
    assert gate.passed and gate.agreement == 1.0 and gate.fp32 == gate.int8 and gate.images == len(y)


def test_gate_fails_on_top1_disagreement():
    y, p = oof_like()
    q = p.copy()
    flip = np.arange(0, len(y), 50)  # 2% of the images change their top class
    q[flip] = np.roll(q[flip], 1, axis=1)
    gate = quantize.gate_figures(y, p, q)
    assert not gate.passed and gate.agreement < quantize.MIN_AGREEMENT


def test_gate_fails_when_malignant_ranking_gets_worse():
    """Every top-1 kept (0.9 on the same class), but the remaining 0.1 scrambled: the malignant
    score ranks worse, which agreement alone would not see."""
    rng = np.random.default_rng(0)
    n = 700
    y = np.arange(n) % 7
    top = np.where(rng.random(n) < 0.8, y, rng.integers(0, 7, n))

    def probs(rest: np.ndarray) -> np.ndarray:
        p = 0.1 * rest / rest.sum(1, keepdims=True)
        p[np.arange(n), top] += 0.9
        return p

    fp32 = probs(np.ones((n, 7)) + np.eye(7)[y])  # the small mass leans to the true class
    int8 = probs(rng.random((n, 7)))
    gate = quantize.gate_figures(y, fp32, int8)
    assert gate.agreement == 1.0
    assert gate.fp32["malignant_auc"] - gate.int8["malignant_auc"] > quantize.MAX_METRIC_DROP
    assert not gate.passed


@pytest.fixture(scope="module")
def int8_run(tiny_data, tmp_path_factory):
    """A tiny run that keeps its fp32 graph beside the int8 one."""
    return train(tiny_data, tmp_path_factory.mktemp("int8") / "run", *TINY, "--keep-fp32")


def test_export_gates_every_image_out_of_fold(int8_run):
    gate = json.loads((int8_run / "cnn" / "quantization.json").read_text())
    table = pd.read_csv(int8_run / "artifacts" / "folds.csv")
    assert gate["images"] == len(table) == sum(m["images"] for m in gate["members"])
    assert [m["images"] for m in gate["members"]] == table.fold.value_counts().sort_index().tolist()
    assert 0 <= gate["agreement"] <= 1 and set(gate["fp32"]) == {"malignant_auc", "malignant_pauc"}


def rebundle(run, tmp_path, passed: bool, keep_fp32: bool):
    """A copy of `run` whose gate says `passed`, bundled again."""
    copy = tmp_path / f"run-{passed}-{keep_fp32}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bundle"))
    gate_path = copy / "cnn" / "quantization.json"
    gate_path.write_text(json.dumps(dict(json.loads(gate_path.read_text()), passed=passed)))
    data_dir = json.loads((copy / "config.json").read_text())["data_dir"]
    return train(data_dir, copy, *TINY, *(["--keep-fp32"] if keep_fp32 else [])) / "bundle"


@pytest.mark.parametrize("passed,keep_fp32", [(True, True), (True, False), (False, True)])
def test_bundle_serves_int8_only_when_the_gate_passed(int8_run, tmp_path, passed, keep_fp32, sample_dir):
    bundle = rebundle(int8_run, tmp_path, passed, keep_fp32)
    m = read_manifest(bundle)
    files = {p.name for p in bundle.iterdir()}
    assert m.cnn.quantization is not None and m.cnn.quantization.passed == passed
    if passed:
        assert m.cnn.precision == "int8" and m.cnn.file == "cnn.int8.onnx"
        assert ("cnn.onnx" in files) == keep_fp32 == (m.cnn.fp32_file == "cnn.onnx")
    else:
        assert m.cnn.precision == "fp32" and m.cnn.file == "cnn.onnx" and "cnn.int8.onnx" not in files
    served = Predictor.load(bundle)
    assert served.cnn_file == m.cnn.file
    if passed and not keep_fp32:
        with pytest.raises(BundleError, match="only its int8 graph"):
            Predictor.load(bundle, cnn_precision="fp32")
        return
    fp32 = Predictor.load(bundle, cnn_precision="fp32")
    assert fp32.cnn_file == "cnn.onnx"
    spec = m.preprocessing
    images = np.stack([load_for_model(p.read_bytes(), spec) for p in sorted((sample_dir / "images").iterdir())[:32]])
    a, b = fp32.cnn_probs(images), served.cnn_probs(images)
    assert a.shape == b.shape == (32, len(m.classes))
    assert np.abs(a - b).mean() < 0.02  # int8 is an approximation of the same ensemble, not another model


def test_int8_ensemble_tracks_fp32_on_real_images(int8_run, sample_dir):
    """The two graphs training wrote, on real images none of the quantization steps chose."""
    spec = ImageSpec.model_validate(read_manifest(int8_run / "bundle").preprocessing.model_dump())
    images = np.stack([load_for_model(p.read_bytes(), spec) for p in sorted((sample_dir / "images").iterdir())[-64:]])
    x = to_model_input(images, spec)
    a = quantize.session(int8_run / "cnn" / "cnn.onnx").run(None, {"image": x})[0]
    b = quantize.session(int8_run / "cnn" / "cnn.int8.onnx").run(None, {"image": x})[0]
    assert np.allclose(b.sum(1), 1, atol=1e-3) and np.abs(a - b).max() < 0.1
