"""Stage 11, bundle: RUN_DIR/bundle/, the only thing the service loads.

Written into a temporary folder and renamed into place, so a crash never leaves a half bundle.
Its manifest is the roster of the run's models (the CNNs, the chosen boosters, the soft vote and
the stack). Also writes artifacts/reference_predictions.json: what training itself computes for
a few images (the fold ensemble in torch; the refit level-2 models on training's own feature
rows), which the tests compare with the torch-free Predictor reading the bundle.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from service.core import labels
from service.core.bundle import library_versions, sha256_file
from service.core.graph import INPUT_NAME, OUTPUT_NAME
from service.core.manifest import (
    MANIFEST_NAME,
    MODEL_CARD,
    TRAINING_IMAGES,
    CnnModel,
    Manifest,
    ModelFile,
    MonitoringReference,
    libraries_of,
    without_paths,
)
from service.core.ood import OodSpec, fit_image_gaussian, image_statistics
from service.core.predictor import Predictor
from service.core.preprocess import to_model_input
from service.core.triage import TriageSpec
from training.config import SOFT_VOTE, STACK
from training.data.io import PROB_COLUMNS, atomic_write_text
from training.ensemble.boosters import BOOSTERS, feature_spec, oof_cnn_probs
from training.reporting.model_card import model_card
from training.run import Run
from training.stages import quantize, select


def outputs(run: Run) -> list[Path]:
    return [run.paths.bundle / MANIFEST_NAME]


def cnn_model(run: Run, arch: str, name: str) -> CnnModel:
    """One CNN as the manifest lists it: its int8 graph when its out-of-fold gate passed (the fp32
    graph rides along with --keep-fp32), else the fp32 graph; the gate's figures are recorded
    either way, and where its initial weights came from."""
    from training.cnn.models import weights_source

    paths = run.paths.cnn(name)
    graph, gate = quantize.served_graph(run, name)
    int8 = graph == paths.int8_graph
    source = weights_source(arch, run.cfg.weights)
    return CnnModel(
        name=name,
        file=graph.name,
        libraries=["numpy", "onnxruntime"],
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        members=run.cfg.folds if run.cfg.served_cnn == "ensemble" else 1,
        architecture=arch,
        weights=source.weights,
        weights_source=source.source,
        weights_sha256=source.sha256,
        training_precision=run.cfg.precision,
        precision="int8" if int8 else "fp32",
        fp32_file=paths.fp32_graph.name if int8 and run.cfg.keep_fp32 else None,
        quantization=gate,
        tta=run.cfg.tta,
        explain_outputs=graph_outputs(graph)[1:],
    )


def roster(run: Run) -> tuple[list[CnnModel], list[ModelFile], ModelFile]:
    """The run's models as the manifest lists them: the CNNs (the lead first), boosters in stacking
    order, stack."""
    cnns = [cnn_model(run, arch, name) for arch, name in zip(run.cfg.arch, run.cfg.cnns)]
    boosters = [ModelFile(name=b, file=f"{b}.pkl", libraries=list(BOOSTERS[b].libraries)) for b in run.cfg.boosters]
    stack = ModelFile(name=STACK, file=f"{STACK}.pkl", libraries=["numpy", "scikit-learn"])
    return cnns, boosters, stack


def graph_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def build_manifest(
    run: Run, folder: Path, cnns: list[CnnModel], boosters: list[ModelFile], stack: ModelFile
) -> Manifest:
    report = json.loads(run.paths.report_json.read_text())
    selection = select.load(run)
    ood = OodSpec.model_validate_json(run.paths.ood_spec.read_text())
    triage = TriageSpec.model_validate_json(run.paths.triage.read_text())
    calibration = report["calibration"]
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    synthetic = bool(report["data"].get("synthetic", False))
    cnn = cnns[0]
    archs = "-".join(run.cfg.arch)
    return Manifest(
        bundle_id=f"{'demo-synthetic' if synthetic else 'ham'}-{archs}-{created:%Y%m%dT%H%M%SZ}-{files[cnn.file][:8]}",
        synthetic_data=synthetic,
        training_images=TRAINING_IMAGES,
        model_card=MODEL_CARD,
        ood=ood if cnn.has_ood_outputs else None,
        default_prior=run.cfg.prior,
        training_prevalence=calibration["training_prevalence"],
        temperature=calibration["temperature"],
        created_at=created.isoformat(),
        classes=labels.CLASSES,
        class_names=labels.CLASS_NAMES,
        malignant_classes=labels.MALIGNANT_CLASSES,
        preprocessing=run.cfg.image_spec(),
        features=feature_spec(run),
        cnns=cnns,
        boosters=boosters,
        soft_vote=SOFT_VOTE,
        stack=stack,
        served=selection.combiner.chosen,
        served_choice=selection.combiner,
        lesion_rule=selection.lesion_rule.chosen,
        lesion_rule_choice=selection.lesion_rule,
        files=files,
        library_versions=library_versions(libraries_of([*cnns, *boosters, stack])),
        monitoring=monitoring_reference(
            run, selection.combiner.chosen, ood.method if cnn.has_ood_outputs else None, triage
        ),
        triage=triage,
        metrics={m: {k: v["value"] for k, v in r.items()} for m, r in report["models"].items()},
        metric_intervals={m: {k: v["ci95"] for k, v in r.items()} for m, r in report["models"].items()},
        training=without_paths(
            {"config": run.cfg.model_dump(), "data": report["data"], "report": "artifacts/report.json"}
        ),
    )


def monitoring_reference(run: Run, served: str, ood_method: str | None, triage: TriageSpec) -> MonitoringReference:
    """The served answer's out-of-fold top-1 shares and the deciles of the out-of-fold OOD score, both
    through the fold graphs at the precision served (the baseline stage), and each triage point's
    referral share where it was measured (the calibration lesions, by default)."""
    import pandas as pd

    top1 = run.oof("served_graphs")[PROB_COLUMNS].to_numpy().argmax(1)  # through the graphs the bundle serves
    shares = {c: float(np.mean(top1 == i)) for i, c in enumerate(labels.CLASSES)}
    edges: list[float] = []
    if ood_method is not None and run.paths.oof("ood").exists():
        scores = pd.read_csv(run.paths.oof("ood"))[ood_method].to_numpy()
        edges = np.quantile(scores, np.arange(1, 10) / 10).tolist()
    referred = {p.name: p.referral_share.value for p in triage.points}
    return MonitoringReference(label_shares=shares, ood_score_edges=edges, referral_shares=referred)


def reference_predictions(run: Run, n: int = 8) -> dict:
    """Training's own numbers for n rows, computed without the Predictor: the served CNN (refit
    model or fold ensemble) run in torch, and the refit level-2 models on the boosters' training
    features (whose CNN part is the out-of-fold CNN probabilities)."""
    import torch

    from training.cnn.loop import served_members
    from training.cnn.models import FoldEnsemble
    from training.ensemble.served import refit_answers

    idx = np.linspace(0, len(run.table) - 1, n).astype(int)
    x = torch.from_numpy(to_model_input(run.images[idx], run.cfg.image_spec()))
    cnn_torch = {}
    with torch.no_grad():
        for arch, name in zip(run.cfg.arch, run.cfg.cnns):
            net = FoldEnsemble(served_members(run, arch), run.cfg.tta)
            cnn_torch[name] = net(x).numpy().astype(np.float64).tolist()
    probs = refit_answers(run, {name: p[idx] for name, p in oof_cnn_probs(run).items()}, idx)
    rows = run.table.iloc[idx]
    return {
        "image_ids": rows.image_id.tolist(),
        "paths": [str(p) for p in rows.path],
        "metadata": [  # as the CSV has them: HAM10000's column names
            {"age": None if np.isnan(a) else float(a), "sex": s, "localization": site}
            for a, s, site in zip(rows.age, rows.sex, rows.localization)
        ],
        "cnn_torch": cnn_torch,
        "probabilities_given_oof_cnn": {k: np.asarray(v).tolist() for k, v in probs.items()},
    }


def run(run: Run) -> None:
    from training.cnn.ood import OOD_FILE, served_gaussian

    final = run.paths.bundle
    tmp = Path(tempfile.mkdtemp(dir=run.dir, prefix=".bundle-"))
    try:
        cnns, boosters, stack = roster(run)
        cnn = cnns[0]  # the lead: its graph scores out-of-distribution images
        for c in cnns:
            for name in c.files:
                shutil.copy2(run.paths.cnn(c.name).dir / name, tmp / name)
        for m in [*boosters, stack]:
            shutil.copy2(run.paths.model(m.name), tmp / m.file)
        run.table[["image_id", "lesion_id"]].to_csv(tmp / TRAINING_IMAGES, index=False)
        if cnn.has_ood_outputs:  # a joined int8 fold ensemble has no explanation outputs
            y, spec = run.table.label.to_numpy(), run.cfg.image_spec()
            fit = served_gaussian(run.paths.cnn(cnn.name).dir / cnn.file, run.images, y, spec)
            (tmp / OOD_FILE).write_bytes(fit.to_npz())
            image_file = OodSpec.model_validate_json(run.paths.ood_spec.read_text()).image_file  # None: older runs
            if image_file:
                (tmp / image_file).write_bytes(fit_image_gaussian(image_statistics(run.images)).to_npz())
        (tmp / MODEL_CARD).write_text(model_card(run, cnns, boosters))
        manifest = build_manifest(run, tmp, cnns, boosters, stack)
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        tmp.chmod(0o755)
        Predictor.load(tmp)  # the bundle must load before it is published
        atomic_write_text(run.paths.reference_predictions, json.dumps(reference_predictions(run)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.log(f"bundle: {final} ({manifest.bundle_id})")
