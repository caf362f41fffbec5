"""Stage 7: RUN_DIR/bundle/, the only thing the service loads.

Written into a temporary folder and renamed into place, so a crash never leaves a half bundle.
Also writes artifacts/reference_predictions.json: the refit models' outputs for a few training
images computed here with torch, which the tests compare with the torch-free predictor.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from service import labels
from service.features import FeatureSpec
from service.manifest import MANIFEST_NAME, CnnInfo, Manifest, MetadataSchema, library_versions, sha256_file
from service.predictor import COMPONENTS, Predictor
from service.preprocess import to_model_input
from training.cnn import image_spec, load_fold_model
from training.io import atomic_write_text
from training.models import FoldEnsemble

LEVEL2_FILES = {"xgboost": "xgboost.pkl", "lightgbm": "lightgbm.pkl", "catboost": "catboost.pkl", "stack": "stack.pkl"}


def build_manifest(run, folder: Path) -> Manifest:
    report = json.loads((run.artifacts / "report.json").read_text())
    spec = FeatureSpec()
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return Manifest(
        bundle_id=f"ham-resnet18-{created:%Y%m%dT%H%M%SZ}-{files['cnn.onnx'][:8]}",
        created_at=created.isoformat(),
        classes=labels.CLASSES,
        class_names=labels.CLASS_NAMES,
        malignant_classes=labels.MALIGNANT_CLASSES,
        preprocessing=image_spec(run.cfg),
        metadata_schema=MetadataSchema(
            sexes=spec.sexes, sites=spec.sites, age_min=labels.AGE_RANGE[0], age_max=labels.AGE_RANGE[1]
        ),
        feature_spec=spec,
        features=spec.names,
        cnn=CnnInfo(members=run.cfg.folds),
        models=LEVEL2_FILES,
        files=files,
        library_versions=library_versions(),
        metrics={m: {k: v["value"] for k, v in r.items()} for m, r in report["models"].items()},
        training={"config": run.cfg.model_dump(), "data": report["data"], "report": "artifacts/report.json"},
    )


def reference_predictions(run, predictor: Predictor, n: int = 8) -> dict:
    """The refit models on n training images, with the CNN run in torch (not onnxruntime)."""
    idx = np.linspace(0, len(run.table) - 1, n).astype(int)
    images = run.images[idx]
    members = [load_fold_model(run.dir / "cnn", k) for k in range(run.cfg.folds)]
    with torch.no_grad():
        cnn = (
            FoldEnsemble(members)(torch.from_numpy(to_model_input(images, image_spec(run.cfg))))
            .numpy()
            .astype(np.float64)
        )
    all_meta = run.dataset.metadata()
    meta = [all_meta[i] for i in idx]
    comps = predictor.predict_components(images, meta, cnn_probs=cnn)
    return {
        "image_ids": run.table.image_id.iloc[idx].tolist(),
        "paths": [str(p) for p in run.table.path.iloc[idx]],
        "metadata": [m.model_dump() for m in meta],
        "probabilities": {name: comps[name].tolist() for name in COMPONENTS},
    }


def write_bundle(run) -> Path:
    final = run.dir / "bundle"
    tmp = Path(tempfile.mkdtemp(dir=run.dir, prefix=".bundle-"))
    try:
        shutil.copy2(run.dir / "cnn" / "cnn.onnx", tmp / "cnn.onnx")
        for name, file in LEVEL2_FILES.items():
            shutil.copy2(run.dir / "models" / f"{name}.pkl", tmp / file)
        manifest = build_manifest(run, tmp)
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        tmp.chmod(0o755)
        predictor = Predictor.load(tmp)  # the bundle must load before it is published
        atomic_write_text(
            run.artifacts / "reference_predictions.json", json.dumps(reference_predictions(run, predictor))
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.log(f"bundle: {final} ({manifest.bundle_id})")
    return final
