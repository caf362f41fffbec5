"""Test-time augmentation: the 8 dihedral views averaged in torch and in the exported graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.core.bundle import read_manifest
from service.core.graph import INPUT_NAME, OUTPUT_NAME
from service.core.predictor import Predictor
from service.core.preprocess import ImageSpec, load_for_model, to_model_input
from tests.helpers import TINY, train
from training.cnn.loop import predict_probs
from training.cnn.models import FoldEnsemble, build_model
from training.cnn.onnx import export_onnx

SPEC = ImageSpec(width=32, height=24)


def real_images(sample_dir, n: int = 12) -> np.ndarray:
    return np.stack([load_for_model(p.read_bytes(), SPEC) for p in sorted((sample_dir / "images").iterdir())[:n]])


def run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def test_tta_is_the_mean_over_the_eight_views(sample_dir):
    torch.manual_seed(0)
    model = build_model("resnet18", 7).eval()
    images = real_images(sample_dir)
    x = torch.from_numpy(to_model_input(images, SPEC))
    t = x.transpose(2, 3)
    views = [x, x.flip(3), x.flip(2), x.flip((2, 3)), t, t.flip(3), t.flip(2), t.flip((2, 3))]
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(1) for v in views]).mean(0).numpy()
    assert np.abs(predict_probs(model, images, SPEC, tta=True) - expected).max() <= 1e-5
    assert np.abs(predict_probs(model, images, SPEC, tta=False) - expected).max() > 1e-3


def test_tta_graph_matches_torch_and_ignores_orientation(sample_dir, tmp_path):
    torch.manual_seed(0)
    members = [build_model("resnet18", 7).eval() for _ in range(2)]
    images = real_images(sample_dir)
    x = to_model_input(images, SPEC)
    export_onnx(members, SPEC, images, tmp_path / "tta.onnx", tta=True, log=lambda m: None)
    export_onnx(members, SPEC, images, tmp_path / "plain.onnx", log=lambda m: None)
    with torch.no_grad():
        expected = FoldEnsemble(members, tta=True)(torch.from_numpy(x)).numpy()
    got = run(tmp_path / "tta.onnx", x)
    assert np.abs(got - expected).max() <= 1e-4
    for flipped in (x[..., ::-1], x[:, :, ::-1], x[:, :, ::-1, ::-1]):  # the same image upside down or mirrored
        flipped = np.ascontiguousarray(flipped)
        assert np.abs(run(tmp_path / "tta.onnx", flipped) - got).max() <= 1e-5
        assert np.abs(run(tmp_path / "plain.onnx", flipped) - run(tmp_path / "plain.onnx", x)).max() > 1e-3


@pytest.mark.scenario
def test_a_tta_run_records_it_and_serves_the_tta_graph(tiny_data, tmp_path, sample_dir):
    run_dir = train(tiny_data, tmp_path / "run", *TINY, "--tta", "--arch", "resnet18")  # the graph code is per CNN
    manifest = read_manifest(run_dir / "bundle")
    assert manifest.cnn.tta and manifest.training.config["tta"]
    assert "8 dihedral views averaged" in (run_dir / "artifacts" / "report.md").read_text()
    predictor = Predictor.load(run_dir / "bundle")
    spec = manifest.preprocessing
    images = np.stack([load_for_model(p.read_bytes(), spec) for p in sorted((sample_dir / "images").iterdir())[:6]])
    probs, flipped = predictor.cnn_probs(images), predictor.cnn_probs(np.ascontiguousarray(images[:, ::-1]))
    assert all(c.tta for c in manifest.cnns)
    for name in probs:  # every CNN's graph averages the flips
        assert np.abs(flipped[name] - probs[name]).max() <= 1e-5, name
