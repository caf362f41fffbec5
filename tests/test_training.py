"""Training stages on the real sample: folds, OOF CNN, ONNX parity, resume, level-2, bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from service.predictor import COMPONENTS, Predictor
from service.preprocess import ImageSpec, load_for_model, to_model_input
from tests.conftest import REPO, make_subset
from training import cnn as cnn_module
from training.config import make_config
from training.data import load_dataset
from training.folds import make_folds
from training.models import FoldEnsemble


def test_folds_never_split_a_lesion_on_the_full_metadata(sample_dir):
    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv")
    folds = make_folds(meta, 5, seed=42)
    assert folds.groupby("lesion_id").fold.nunique().max() == 1
    assert set(folds.fold) == set(range(5)) and len(folds) == len(meta)
    # stratified: every fold's melanoma share is near the overall share
    share = meta.assign(fold=folds.fold).groupby("fold").dx.apply(lambda d: (d == "mel").mean())
    assert share.max() - share.min() < 0.03


def test_smoke_run_folds_and_oof(smoke_run):
    folds = pd.read_csv(smoke_run / "artifacts" / "folds.csv")
    assert list(folds.columns) == ["image_id", "lesion_id", "fold"]
    assert folds.groupby("lesion_id").fold.nunique().max() == 1
    for model in COMPONENTS:
        oof = pd.read_csv(smoke_run / "artifacts" / f"oof_{model}.csv")
        assert list(oof.columns) == ["image_id", "fold"] + [
            f"p_{c}" for c in ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        ]
        assert oof.image_id.is_unique and set(oof.image_id) == set(folds.image_id)
        merged = oof.merge(folds, on="image_id", suffixes=("", "_folds"))
        assert (merged.fold == merged.fold_folds).all()
        assert np.allclose(oof.filter(like="p_").sum(1), 1, atol=1e-5)


def test_fold_model_never_trains_on_its_own_fold(tmp_path, sample_dir, monkeypatch):
    """Spy on what each fold's training set holds: no image of the validation fold's lesions."""
    d = make_subset(sample_dir, tmp_path / "d", per_class=6)
    ds = load_dataset(d, log=lambda m: None)
    table = ds.table.merge(make_folds(ds.table, 2, 0)[["image_id", "fold"]], on="image_id")
    cfg = make_config("smoke", str(d), folds=2, epochs=1, image_size=32, workers=0)
    images = np.stack([np.full((24, 32, 3), i % 256, np.uint8) for i in range(len(table))])
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(len(table)) % 256, np.arange(len(table)) // 256  # unique ids
    seen = {}
    real = cnn_module.ImageDataset

    def spy(imgs, labels, augment):
        if augment:
            seen.setdefault("train", []).append({(int(a), int(b)) for a, b in imgs[:, 0, 0, :2]})
        return real(imgs, labels, augment)

    monkeypatch.setattr(cnn_module, "ImageDataset", spy)
    oof = cnn_module.run_cnn(cfg, tmp_path / "run", table, images, "bf16", log=lambda m: None)
    ident = {(int(a), int(b)): i for i, (a, b) in enumerate(images[:, 0, 0, :2])}
    for k, train_ids in enumerate(seen["train"]):
        trained_rows = {ident[t] for t in train_ids}
        assert not trained_rows & set(np.flatnonzero(table.fold == k))
        assert set(table.lesion_id.iloc[list(trained_rows)]).isdisjoint(table.lesion_id[table.fold == k])
    assert len(oof) == len(table) and (oof.fold.to_numpy() == table.fold.to_numpy()).all()


def test_onnx_matches_torch_on_real_images(smoke_run, sample_dir):
    cfg = json.loads((smoke_run / "config.json").read_text())
    spec = ImageSpec(width=cfg["image_size"], height=cfg["image_size"] * 3 // 4)
    paths = sorted((sample_dir / "images").iterdir())[:16]
    images = np.stack([load_for_model(p.read_bytes(), spec) for p in paths])
    members = [cnn_module.load_fold_model(smoke_run / "cnn", k) for k in range(cfg["folds"])]
    x = to_model_input(images, spec)
    with torch.no_grad():
        expected = FoldEnsemble(members)(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(smoke_run / "bundle" / "cnn.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": x})[0]
    assert np.abs(got - expected).max() <= 1e-4
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis


def test_export_fails_the_run_when_parity_breaks(tmp_path, monkeypatch):
    from training import export

    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no difference can pass
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 8, 7))]
    images = np.random.default_rng(0).integers(0, 255, (4, 6, 8, 3), dtype=np.uint8)
    with pytest.raises(export.ExportError, match="differs from torch"):
        export.export_onnx(members, ImageSpec(width=8, height=6), images, tmp_path / "m.onnx", log=lambda m: None)
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_killed_run_resumes(tmp_path, sample_dir):
    d = make_subset(sample_dir, tmp_path / "d", per_class=8)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "training",
        "cnn",
        "--data-dir",
        str(d),
        "--out",
        str(run_dir),
        "--preset",
        "smoke",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--workers",
        "0",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "cnn" / "fold1.ckpt").exists():  # fold 0 done, fold 1 one epoch in
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fold0 = (run_dir / "cnn" / "fold0.pt").stat().st_mtime_ns
    assert not (run_dir / "artifacts" / "oof_cnn.csv").exists()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fold 0: already trained, skipping" in out.stdout
    assert "fold 1: resuming after epoch 1" in out.stdout
    assert (run_dir / "cnn" / "fold0.pt").stat().st_mtime_ns == fold0
    assert len(pd.read_csv(run_dir / "artifacts" / "oof_cnn.csv")) == len(pd.read_csv(d / "HAM10000_metadata.csv"))
    assert not list(run_dir.rglob("*.tmp"))
    # a resumed run must not silently change settings
    changed = subprocess.run(
        cmd[:-4] + ["--epochs", "3", "--image-size", "32"], cwd=REPO, capture_output=True, text=True
    )
    assert changed.returncode == 2 and "different settings" in changed.stderr


def test_report_has_every_model_and_metric(smoke_run):
    report = json.loads((smoke_run / "artifacts" / "report.json").read_text())
    metrics = {"bmca", "macro_auc", "accuracy", "log_loss", "ece", "malignant_auc", "malignant_pauc"}
    assert set(report["models"]) == set(COMPONENTS)
    for model in COMPONENTS:
        assert set(report["models"][model]) == metrics
        for name, v in report["models"][model].items():
            lo, hi = v["ci95"]
            assert np.isfinite([lo, hi]).all() and lo <= hi, name
            if name in (
                "bmca",
                "accuracy",
                "macro_auc",
                "malignant_auc",
            ):  # ECE and log loss are biased under resampling
                assert lo - 0.02 <= v["value"] <= hi + 0.02, (model, name)
    assert 0 <= report["models"]["stack"]["malignant_pauc"]["value"] <= 0.2
    assert report["paired_difference"]["models"] == "stack - cnn"
    assert report["data"]["images"] == 2118 and report["data"]["skipped_missing_images"] == 7897
    for plot in ("roc_stack.png", "confusion_stack.png", "reliability.png"):
        assert (smoke_run / "artifacts" / "plots" / plot).read_bytes()[:4] == b"\x89PNG"


def test_bundle_is_complete_and_reproduces_training(smoke_run):
    bundle = smoke_run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    for key in (
        "format_version",
        "bundle_id",
        "created_at",
        "classes",
        "class_names",
        "malignant_classes",
        "preprocessing",
        "metadata_schema",
        "features",
        "files",
        "library_versions",
        "metrics",
    ):
        assert manifest[key], key
    assert manifest["metrics"]["stack"]["bmca"] > 0
    ref = json.loads((smoke_run / "artifacts" / "reference_predictions.json").read_text())
    predictor = Predictor.load(bundle)
    from pathlib import Path

    from service.features import ClinicalMetadata

    spec = predictor.manifest.preprocessing
    images = np.stack([load_for_model(Path(p).read_bytes(), spec) for p in ref["paths"]])
    got = predictor.predict_components(images, [ClinicalMetadata(**m) for m in ref["metadata"]])
    for name in COMPONENTS:
        assert np.abs(got[name] - np.array(ref["probabilities"][name])).max() <= 1e-4, name
    assert not list(smoke_run.glob(".bundle-*"))


def test_service_code_does_not_import_torch():
    code = "import sys, service.predictor, service.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
