"""Training stages on the real sample: folds, OOF CNN, ONNX parity, resume, level-2, report, bundle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from service.core.bundle import read_manifest
from service.core.predictor import Predictor
from service.core.preprocess import ImageSpec, load_for_model, to_model_input
from tests.helpers import BLOCK, CLASSES, REPO, TINY, train
from training.cnn import loop as cnn_module
from training.cnn.models import FoldEnsemble
from training.config import ALL_BOOSTERS, RunConfig, make_config, native_precision, save_or_check
from training.data.folds import make_folds
from training.data.ham10000 import load_dataset
from training.errors import ConfigMismatch
from training.layout import RunLayout
from training.run import Run


def run_config(run_dir: Path) -> RunConfig:
    return RunConfig(**json.loads((run_dir / "config.json").read_text()))


def folded(data_dir: Path) -> pd.DataFrame:
    """The dataset's rows with 3 lesion-grouped folds, as the cnn stage receives them."""
    ds = load_dataset(data_dir, log=lambda m: None)
    return ds.table.merge(make_folds(ds.table, 3, 0)[["image_id", "fold"]], on="image_id")


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
    assert list(folds.columns) == ["image_id", "lesion_id", "fold", "calibration"]
    assert folds.groupby("lesion_id").fold.nunique().max() == 1
    for model in run_config(smoke_run).components:
        oof = pd.read_csv(smoke_run / "artifacts" / f"oof_{model}.csv")
        assert list(oof.columns) == ["image_id", "fold"] + [f"p_{c}" for c in CLASSES]
        assert oof.image_id.is_unique and set(oof.image_id) == set(folds.image_id)
        merged = oof.merge(folds, on="image_id", suffixes=("", "_folds"))
        assert (merged.fold == merged.fold_folds).all()
        assert np.allclose(oof.filter(like="p_").sum(1), 1, atol=1e-5)


def test_fold_model_never_trains_on_its_own_fold(tmp_path, subset, monkeypatch):
    """Spy on what each fold's training set holds: no image of the validation fold's lesions."""
    d = subset(6)
    table = folded(d)
    cfg = make_config("smoke", str(d), folds=3, epochs=1, image_size=32)
    images = np.stack([np.full((24, 32, 3), i % 256, np.uint8) for i in range(len(table))])
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(len(table)) % 256, np.arange(len(table)) // 256  # unique ids
    seen = []
    real = cnn_module.TrainBatches

    def spy(imgs, labels, *args, **kwargs):
        seen.append({(int(a), int(b)) for a, b in imgs[:, 0, 0, :2]})
        return real(imgs, labels, *args, **kwargs)

    monkeypatch.setattr(cnn_module, "TrainBatches", spy)
    oof = cnn_module.run_cnn(cfg, "resnet18", RunLayout(tmp_path / "run"), table, images, log=lambda m: None)
    ident = {(int(a), int(b)): i for i, (a, b) in enumerate(images[:, 0, 0, :2])}
    assert len(seen) == cfg.folds
    for k, train_ids in enumerate(seen):
        trained_rows = {ident[t] for t in train_ids}
        assert not trained_rows & set(np.flatnonzero(table.fold == k))
        assert set(table.lesion_id.iloc[list(trained_rows)]).isdisjoint(table.lesion_id[table.fold == k])
    assert len(oof) == len(table) and (oof.fold.to_numpy() == table.fold.to_numpy()).all()


def test_held_out_labels_never_choose_the_fold_model(tmp_path, subset, monkeypatch):
    """The fold's validation score is a learning curve only: whichever epoch scores best on the
    held-out fold, the fold keeps its last epoch, so its OOF predictions and weights are the same."""
    d = subset(4)
    table = folded(d)
    cfg = make_config("smoke", str(d), folds=3, epochs=3, image_size=32, precision="fp32")
    images = np.random.default_rng(0).integers(0, 256, (len(table), 24, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(cnn_module, "device_and_dtype", lambda p: (torch.device("cpu"), None))  # CPU: reproducible
    outputs = []
    for peak in (1, 3):  # the validation score peaks at the first epoch, then at the last
        scores = iter([1.0 if e == peak else 0.1 * e for _ in range(cfg.folds) for e in range(1, cfg.epochs + 1)])
        monkeypatch.setattr(cnn_module, "evaluate", lambda *a, s=scores, **kw: (next(s), 1.0))
        run_dir = tmp_path / f"peak{peak}"
        oof = cnn_module.run_cnn(cfg, "resnet18", RunLayout(run_dir), table, images, log=lambda m: None)
        summary = json.loads((run_dir / "cnn" / "fold0.json").read_text())
        assert summary["epochs"] == cfg.epochs and len(summary["history"]) == cfg.epochs
        assert summary["val_bmca"] == summary["history"][-1]["val_bmca"]
        outputs.append((oof, torch.load(run_dir / "cnn" / "fold0.pt", weights_only=True)))
    (oof_a, weights_a), (oof_b, weights_b) = outputs
    pd.testing.assert_frame_equal(oof_a, oof_b)
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)


def test_onnx_matches_torch_on_real_images(smoke_run, sample_dir):
    cfg = run_config(smoke_run)
    spec = cfg.image_spec()
    paths = sorted((sample_dir / "images").iterdir())[:16]
    images = np.stack([load_for_model(p.read_bytes(), spec) for p in paths])
    x = to_model_input(images, spec)
    manifest = read_manifest(smoke_run / "bundle")
    for arch, name in zip(cfg.arch, cfg.cnns):
        members = cnn_module.served_members(Run(cfg, smoke_run), arch)  # <cnn>/refit.pt (the export stage trained it)
        with torch.no_grad():
            expected = FoldEnsemble(members)(torch.from_numpy(x)).numpy()
        fp32_graph = smoke_run / name / f"{name}.onnx"  # what the bundle serves or, if int8 passed, carries beside it
        session = ort.InferenceSession(str(fp32_graph), providers=["CPUExecutionProvider"])
        got = session.run([manifest.cnn.output_name], {manifest.cnn.input_name: x})[0]
        assert np.abs(got - expected).max() <= 1e-4, name
        assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis


def test_export_fails_the_run_when_parity_breaks(tmp_path, monkeypatch):
    from training.cnn import onnx as export
    from training.errors import ExportError

    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no difference can pass
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 8, 7))]
    images = np.random.default_rng(0).integers(0, 255, (4, 6, 8, 3), dtype=np.uint8)
    with pytest.raises(ExportError, match="differs from torch"):
        export.export_onnx(members, ImageSpec(width=8, height=6), images, tmp_path / "m.onnx", log=lambda m: None)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.scenario
def test_killed_run_resumes(tmp_path, subset):
    d = subset(8)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "cnn", "--data-dir", str(d), "--out", str(run_dir)]
    cmd += ["--preset", "smoke", "--folds", "3", "--epochs", "2", "--image-size", "32", "--arch", "resnet18"]
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
    changed = subprocess.run(cmd + ["--epochs", "3"], cwd=REPO, capture_output=True, text=True)
    assert changed.returncode == 2 and "different settings (epochs: 2 -> 3)" in changed.stderr


def test_precision_and_boosters_are_result_changing_settings(tmp_path):
    save_or_check(make_config("smoke", "data", precision="bf16"), tmp_path)
    with pytest.raises(ConfigMismatch, match="precision: bf16 -> fp32"):
        save_or_check(make_config("smoke", "data", precision="fp32"), tmp_path)
    with pytest.raises(ConfigMismatch, match="boosters"):
        save_or_check(make_config("smoke", "data", boosters="xgboost"), tmp_path)
    assert (
        make_config("smoke", "d").precision == make_config("smoke", "d", precision="auto").precision in ("bf16", "fp32")
    )
    assert make_config("smoke", "d", boosters="catboost, xgboost").boosters == ["xgboost", "catboost"]
    with pytest.raises(ConfigMismatch, match="--boosters: .*subset of xgboost, lightgbm, catboost"):
        make_config("smoke", "d", boosters="xgboost,gbm")


def test_every_configurable_booster_is_implemented():
    from training.ensemble.boosters import BOOSTERS

    assert list(BOOSTERS) == ALL_BOOSTERS


def test_report_has_every_model_and_metric(smoke_run, sample_dir):
    report = json.loads((smoke_run / "artifacts" / "report.json").read_text())
    metrics = {"bmca", "macro_auc", "accuracy", "log_loss", "ece", "malignant_auc", "malignant_pauc"}
    components = run_config(smoke_run).components
    assert list(report["models"]) == components
    for model in components:
        assert set(report["models"][model]) == metrics
        for name, v in report["models"][model].items():
            lo, hi = v["ci95"]
            assert np.isfinite([lo, hi]).all() and lo <= hi, name
            if name in ("bmca", "accuracy", "macro_auc", "malignant_auc"):  # ECE, log loss: biased under resampling
                assert lo - 0.02 <= v["value"] <= hi + 0.02, (model, name)
    served = report["served"]
    assert served == report["selection"]["combiner"]["chosen"] == read_manifest(smoke_run / "bundle").served
    assert 0 <= report["models"][served]["malignant_pauc"]["value"] <= 0.2
    assert report["paired_difference"]["models"] == f"{served} - cnn"  # the lead CNN
    lesions = report["lesion_level"]
    assert list(lesions["models"]) == components and lesions["lesions"] == report["data"]["lesions"]
    assert set(report["lesion_gain"]) == {"all_images", "multi_image_lesions"}
    assert set(report["selection"]["nested"]) == {"images", "lesions"}
    present, listed = pd.read_csv(sample_dir / "images_present.csv"), pd.read_csv(sample_dir / "HAM10000_metadata.csv")
    assert report["data"]["images"] == len(present) and report["data"]["skipped_missing_images"] == len(listed) - len(
        present
    )
    assert report["config"]["precision"] == native_precision()  # no --precision given: auto
    assert report["served_cnn"] == "refit" and report["int8_gates"] == {}  # the fixture's --no-int8 (test_int8.py)
    plots = (
        "roc_served.png",
        "roc_cnn.png",
        "roc_cnn_efficientnet_lite0.png",
        "confusion_served.png",
        "reliability.png",
    )
    for plot in plots:
        assert (smoke_run / "artifacts" / "plots" / plot).read_bytes()[:4] == b"\x89PNG"


def test_bundle_reproduces_what_training_computed(smoke_run):
    """The torch-free Predictor, reading only the bundle, against training's own numbers
    (the fold ensemble in torch; the refit level-2 models on training's feature rows)."""
    bundle = smoke_run / "bundle"
    manifest = read_manifest(bundle)
    assert set(manifest.files) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert (
        manifest.cnn.training_precision == run_config(smoke_run).precision
        and manifest.metrics[manifest.served]["bmca"] > 0.35  # it learns: chance is 1/7; the smoke run reaches ~0.5
    )
    assert [c.architecture for c in manifest.cnns] == ["resnet18", "efficientnet_lite0"]  # the default: both
    for c in manifest.cnns:  # the default: one refit model each
        assert c.members == 1 and (smoke_run / c.name / "refit.pt").exists()
    ref = json.loads((smoke_run / "artifacts" / "reference_predictions.json").read_text())
    predictor = Predictor.load(bundle, cnn_precision="fp32")  # torch computed fp32 (int8 is gated apart)
    images = np.stack([load_for_model(Path(p).read_bytes(), manifest.preprocessing) for p in ref["paths"]])
    cnn_probs = predictor.cnn_probs(images)
    assert list(cnn_probs) == list(ref["cnn_torch"]) == [c.name for c in manifest.cnns]
    for name, probs in cnn_probs.items():  # each graph against torch
        assert np.abs(probs - np.array(ref["cnn_torch"][name])).max() <= 1e-4, name
    expected = ref["probabilities_given_oof_cnn"]
    # metadata exactly as the CSV has it (`localization`), validated by the core like a request
    oof_cnns = {c.name: np.array(expected[c.name]) for c in manifest.cnns}
    got = predictor.predict_components(images, ref["metadata"], cnn_probs=oof_cnns)
    assert list(got) == manifest.components == list(expected)
    for name in manifest.components:
        assert np.abs(got[name] - np.array(expected[name])).max() <= 1e-5, name
    assert not list(smoke_run.glob(".bundle-*"))


def test_bundle_with_chosen_boosters_serves_exactly_them(tiny_data, tmp_path, app_factory, sample_dir):
    extra = ["--boosters", "lightgbm,xgboost", "--no-int8", "--served-cnn", "ensemble", "--arch", "resnet18"]
    run_dir = train(tiny_data, tmp_path / "run", *TINY, *extra)
    bundle = run_dir / "bundle"
    manifest = read_manifest(bundle)
    assert [b.name for b in manifest.boosters] == ["xgboost", "lightgbm"]
    assert sorted(p.name for p in bundle.iterdir()) == [
        "MODEL_CARD.md",
        "cnn.onnx",
        "lightgbm.pkl",
        "manifest.json",
        "ood.npz",
        "ood_image.npz",
        "stack.pkl",
        "training_images.csv",
        "xgboost.pkl",
    ]
    assert "catboost" not in manifest.library_versions
    assert manifest.cnn.members == 3 and manifest.cnn.quantization is None  # the fold ensemble, no int8
    assert manifest.components == ["cnn", "xgboost", "lightgbm", "soft_vote", "stack"]
    api = app_factory(bundle)
    assert api.get("/model").json()["components"] == manifest.components
    image = sorted((sample_dir / "images").iterdir())[0].read_bytes()
    r = api.post("/predict", files={"image": image}, data={"metadata": '{"age": 50}'})
    assert r.status_code == 200 and list(r.json()["components"]) == manifest.components


def test_boosters_train_on_the_gpu_when_training_sees_one(monkeypatch):
    import xgboost

    from training.ensemble import boosters

    monkeypatch.setattr(boosters, "training_device", lambda: "cuda")
    assert boosters.make_catboost(10, 0, False).get_params()["task_type"] == "GPU"
    cuda_build = bool(xgboost.build_info().get("USE_CUDA"))
    xgb = boosters.make_xgboost(10, 0, False)
    assert xgb.get_params()["device"] == ("cuda" if cuda_build else "cpu")  # xgboost-cpu has no CUDA
    assert boosters.for_serving(xgb).get_params()["device"] == "cpu"
    monkeypatch.setattr(boosters, "training_device", lambda: "cpu")
    assert boosters.make_catboost(10, 0, False).get_params()["task_type"] == "CPU"
    assert boosters.make_xgboost(10, 0, False).get_params()["device"] == "cpu"


def test_a_class_too_rare_for_the_boosters_splits_is_a_clear_error():
    from training.ensemble.boosters import check_every_class_trains
    from training.errors import DataError

    fold = np.repeat(np.arange(3), 14)
    y = np.tile(np.arange(7), 6)
    check_every_class_trains(y, fold)  # every class in every split: fine
    y[(y == 3) & (fold != 0)] = 0  # df only in fold 0: the split training on folds 0's complement lacks it
    with pytest.raises(DataError, match="df is missing from one .* use fewer --folds"):
        check_every_class_trains(y, fold)


def test_a_fold_trained_under_the_best_epoch_rule_is_named_when_resumed(tmp_path, subset):
    """Runs from before the last-epoch rule resume, but their old folds are called out."""
    d = subset(4)
    table = folded(d)
    cfg = make_config("smoke", str(d), folds=3, epochs=1, image_size=32, precision="fp32")
    images = np.random.default_rng(0).integers(0, 256, (len(table), 24, 32, 3), dtype=np.uint8)
    cnn_module.run_cnn(cfg, "resnet18", RunLayout(tmp_path), table, images, log=lambda m: None)
    summary = tmp_path / "cnn" / "fold1.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "best_epoch": 1}))  # as older versions wrote
    logged: list[str] = []
    cnn_module.run_cnn(cfg, "resnet18", RunLayout(tmp_path), table, images, log=logged.append)
    warnings = [m for m in logged if m.startswith("warning:")]
    assert len(warnings) == 1 and "fold 1 was trained before fold models kept their last epoch" in warnings[0]


def test_every_run_setting_is_a_flag_declared_once():
    """The command line is generated from RunConfig: each field a flag whose help is the field's
    description; booleans have --no- forms; the preset's settings say so instead of a number."""
    from training.__main__ import build_parser
    from training.config import PRESETS, RunConfig

    run = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "run" in a.choices).choices["run"]
    flags = {a.dest: a for a in run._actions}
    for name, field in RunConfig.model_fields.items():
        assert name in flags and field.description and field.description in flags[name].help, name
    assert "--no-int8" in flags["int8"].option_strings
    assert flags["ood_method"].choices == ["mahalanobis", "energy"] and "auto" in flags["precision"].choices
    assert all("the preset's" in flags[k].help for k in PRESETS["cpu"])
    args = run.parse_args(["--data-dir", "d", "--out", "o", "--no-int8", "--epochs", "3"])
    assert args.int8 is False and args.epochs == 3 and args.tta is None and args.lr is None


def test_the_ood_flag_is_designed_to_fire_on_5_percent_of_real_images(tiny_run):
    """The design share the docs promise ("to flag 5 % of real images", docs/api.md) and the alert
    reads as `lesion_ood_design_share`: every preset's default, and what a run that names none fits
    its bundle's flag to."""
    from training.config import PRESETS, make_config

    for preset in PRESETS:
        assert make_config(preset, "d", precision="fp32").ood_share == 0.05, preset
    assert json.loads((tiny_run / "config.json").read_text())["ood_share"] == 0.05  # TINY names no --ood-share
    assert json.loads((tiny_run / "bundle" / "manifest.json").read_text())["ood"]["flag_share"] == 0.05


# Each training package and the packages it may import (its own modules always); top-level modules
# (config, errors, layout, run) are the floor every package stands on.
LAYERS = {
    "data": set(),
    "evaluation": {"data"},
    "cnn": {"data", "evaluation"},
    "ensemble": {"data", "evaluation"},  # the served choice is scored by the evaluation's metrics
    "reporting": {"data", "evaluation"},
    "stages": {"data", "evaluation", "cnn", "ensemble", "reporting"},
}
FLOOR = {"config", "errors", "layout", "run"}


def imported_training_modules(path) -> set[str]:
    """The training.* modules a file imports, at any depth of its code (inside functions too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.startswith("training.")}
    return found


def test_training_packages_import_only_downward():
    """The stages sit on the rooms below them; no room imports a stage or one beside it that it
    should not; reporting never loads torch (it reads JSON and draws with matplotlib)."""
    root = REPO / "training"
    for package, allowed in LAYERS.items():
        files = sorted((root / package).glob("*.py"))
        assert files, package
        for f in files:
            for name in imported_training_modules(f):
                parts = name.split(".")
                target = parts[1]
                if target in FLOOR or target == package:
                    continue
                assert target in allowed, f"training/{package}/{f.name} imports {name}"
    floor_imports = {n.split(".")[1] for f in FLOOR for n in imported_training_modules(root / f"{f}.py")}
    assert floor_imports <= FLOOR | {"data"}, floor_imports  # a run reads its data; nothing above
    for stage in (
        "folds",
        "cnn",
        "export",
        "boosters",
        "stack",
        "select",
        "quantize",
        "baseline",
        "triage",
        "report",
        "bundle",
    ):
        assert (root / "stages" / f"{stage}.py").exists()
    code = BLOCK.format(names=["torch", "torchvision"])
    code += (
        "import training.pipeline, training.reporting.markdown, training.reporting.plots, training.reporting.model_card"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listing = BLOCK.format(names=["torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "xgboost", "catboost"])
    out = subprocess.run(
        [sys.executable, "-c", listing + "import training.pipeline"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr  # the stage registry loads no heavy library


def test_a_saved_config_outside_todays_bounds_is_a_clear_error(tmp_path):
    from training.config import saved_config

    (tmp_path / "config.json").write_text(json.dumps({"data_dir": "d", "bootstrap": 0}))
    with pytest.raises(ConfigMismatch, match=r"config.json: bootstrap: .*use a new --out"):
        saved_config(tmp_path)


def test_no_training_machine_path_reaches_the_bundle_summary():
    from service.core.manifest import without_paths

    training = {
        "config": {"data_dir": "/home/me/ham", "weights": "/home/me/w/r18.pt", "lr": 0.1},
        "data": {"data_dir": "/x/y"},
    }
    assert without_paths(training) == {
        "config": {"data_dir": "ham", "weights": "r18.pt", "lr": 0.1},
        "data": {"data_dir": "y"},
    }


def test_an_unwritable_run_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Not a traceback: what failed, and (for a permission error) the user it ran as and the fix,
    such as the container's uid against a bind-mounted folder."""
    from training.__main__ import check_writable, main
    from training.errors import RunError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["demo-data", "--out", str(blocker / "demo")]) == 2
    assert "cannot write the run folder" in capsys.readouterr().err

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.touch", refuse)
    with pytest.raises(RunError, match=r"Permission denied; this process runs as uid \d+.*docker run --user"):
        check_writable(tmp_path / "runs")


def test_a_stage_runs_again_when_one_it_reads_ran(tmp_path, monkeypatch):
    """A resumed run whose earlier stage had to run (its outputs were missing) reruns the finished
    stages that read it, from scratch: their outputs would describe the older models."""
    from types import SimpleNamespace

    from training import pipeline
    from training.config import make_config

    ran: list[str] = []

    def fake(name: str):
        out = tmp_path / "run" / f"{name}.out"

        def run(run):
            assert not out.exists(), f"{name} ran over its old output"
            ran.append(name)
            out.write_text("x")

        return SimpleNamespace(outputs=lambda run: [out], run=run)

    off = SimpleNamespace(outputs=lambda run: [], run=lambda run: ran.append("off"))  # switched off by the settings
    stages = [
        pipeline.Stage("a", fake("a")),
        pipeline.Stage("b", fake("b"), ("a",)),
        pipeline.Stage("off", off, ("a",)),
        pipeline.Stage("c", fake("c"), ("b",)),
    ]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    cfg = make_config("smoke", str(tmp_path / "data"), precision="fp32")
    logs: list[str] = []
    names = ["a", "b", "off", "c"]
    pipeline.run_pipeline(cfg, tmp_path / "run", names, log=logs.append)
    pipeline.run_pipeline(cfg, tmp_path / "run", names, log=logs.append)
    assert ran == ["a", "b", "c"] and sum("already done" in m for m in logs) == 3
    (tmp_path / "run" / "b.out").unlink()
    pipeline.run_pipeline(cfg, tmp_path / "run", names, log=logs.append)
    assert ran == ["a", "b", "c", "b", "c"] and "[c] running again: b ran in this invocation" in logs


def test_served_overrides_the_rule_rerunning_only_the_stages_after_the_choice(tiny_run, tiny_data, tmp_path):
    auto = json.loads((tiny_run / "artifacts" / "selection-auto.json").read_text())["combiner"]
    other = "stack" if auto["chosen"] != "stack" else "soft_vote"
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    cmd = [sys.executable, "-m", "training", "run", "--data-dir", str(tiny_data), "--out", str(copy), *TINY]
    out = subprocess.run([*cmd, "--served", other], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[cnn] already done" in out.stdout and "[boosters] already done" in out.stdout
    assert "[select] running" in out.stdout and "[bundle] running again" in out.stdout
    manifest = read_manifest(copy / "bundle")
    assert manifest.served == other and manifest.served_choice is not None
    assert (manifest.served_choice.requested, manifest.served_choice.picked) == (other, auto["picked"])
    assert (
        f"requested with `--served` (the rule picks {auto['picked']})"
        in (copy / "bundle" / "MODEL_CARD.md").read_text()
    )
    bad = subprocess.run([*cmd, "--served", "median"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--served: " in bad.stderr and "auto or one of cnn" in bad.stderr


def test_the_one_cycle_schedule_builds_for_any_number_of_steps():
    """A fifth of 5 steps is one warm-up step, on which OneCycleLR divides by zero: a 400-image demo
    run crashed when its refit lost its calibration rows (320 images, 5 batches of 64)."""
    for steps in range(1, 200):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=steps, pct_start=cnn_module.warmup_share(steps)
        )
        for _ in range(steps - 1):
            opt.step()
            sched.step()
