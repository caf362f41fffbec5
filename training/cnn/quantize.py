"""int8 CNN: each fold model quantized statically, gated on its own out-of-fold images.

Each fold model is exported alone, quantized with onnxruntime's static quantization (calibrated
on images of its own training folds), and run beside its fp32 graph on the fold it never saw.
The out-of-fold probabilities of both give the gate's figures: top-1 agreement, and the malignant
AUC and ISIC pAUC of each. The quantized members are then joined into one graph that averages
their probabilities, exactly as the fp32 ensemble does. The bundle serves it only if the gate
passed (`training.stages.bundle`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import compose, helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.core.graph import INPUT_NAME, OUTPUT_NAME
from service.core.labels import CLASSES
from service.core.manifest import QuantizationGate
from service.core.preprocess import ImageSpec, to_model_input
from training.cnn.onnx import export_onnx
from training.data.io import atomic_write
from training.evaluation.metrics import all_metrics

MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 on out-of-fold images
MAX_METRIC_DROP = 0.002  # malignant AUC and pAUC: int8 may be at most this much worse than fp32
CALIBRATION_IMAGES = 256  # per fold model, from its training folds
# uint8 activations, int8 weights with reduce_range (7-bit): AVX2 CPUs without VNNI compute
# u8 x s8 products with 16-bit saturation, and full-range weights overflow it. Measured on fold 2 of
# a cpu-preset run: top-1 agreement with fp32 0.991 with reduce_range vs 0.974 without it (and
# 0.974 for u8 weights, 0.974 for percentile calibration), at the same speed.
# Only the convolutional trunk is quantized: the classifier layer and the softmax stay fp32, so
# probabilities keep their full resolution (8-bit probabilities would round small ones to 0).
QUANT_OPTIONS = dict(
    quant_format=QuantFormat.QOperator,
    activation_type=QuantType.QUInt8,
    weight_type=QuantType.QInt8,
    reduce_range=True,
    per_channel=True,
    op_types_to_quantize=["Conv", "Add", "MaxPool", "GlobalAveragePool"],
)


class Images(CalibrationDataReader):
    """Calibration batches of normalised images, as the service will feed them."""

    def __init__(self, images: np.ndarray, spec: ImageSpec, batch: int = 32) -> None:
        self.batches = iter(
            [{INPUT_NAME: to_model_input(images[i : i + batch], spec)} for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def session(model: str | Path | bytes) -> ort.InferenceSession:
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_graph(sess: ort.InferenceSession, images: np.ndarray, spec: ImageSpec, batch: int = 128) -> np.ndarray:
    out = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: to_model_input(images[i : i + batch], spec)})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out).astype(np.float64)


def quantize_member(fp32_path: Path, calibration: np.ndarray, spec: ImageSpec, out: Path) -> None:
    """Static int8 quantization of one exported fold model, calibrated on `calibration` images."""
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))  # shape inference + graph optimisation, as ORT recommends
    quantize_static(str(pre), str(out), Images(calibration, spec), **QUANT_OPTIONS)
    pre.unlink()


def join_members(paths: list[Path]) -> onnx.ModelProto:
    """One graph: every member reads INPUT_NAME; OUTPUT_NAME is the mean of their probabilities."""
    members = [compose.add_prefix(onnx.load(str(p)), f"m{i}_", rename_inputs=False) for i, p in enumerate(paths)]
    first = members[0]
    nodes, inits, infos = [], [], []
    for m in members:
        nodes += m.graph.node
        inits += m.graph.initializer
        infos += m.graph.value_info
    mean = helper.make_node("Mean", [m.graph.output[0].name for m in members], [OUTPUT_NAME])
    classes = first.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    output = helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", classes])
    graph = helper.make_graph(
        [*nodes, mean], "fold_ensemble_int8", list(first.graph.input), [output], inits, value_info=infos
    )
    model = helper.make_model(graph, opset_imports=first.opset_import, producer_name="training.cnn.quantize")
    onnx.checker.check_model(model)
    return model


def quantize_ensemble(
    members: list[torch.nn.Module],
    images: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    spec: ImageSpec,
    out: Path | None,
    seed: int,
    tta: bool = False,
    log=print,
) -> QuantizationGate:
    """Quantize every fold model, gate on out-of-fold images, write `out` (the int8 ensemble) unless
    it is None.

    Returns the gate's figures; `out` is written whether or not the gate passed: the bundle
    decides what it serves, and a failed int8 graph stays in RUN_DIR/cnn for comparison."""
    rng = np.random.default_rng(seed)
    fp32_oof, int8_oof = np.zeros((len(images), len(CLASSES))), np.zeros((len(images), len(CLASSES)))
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, member in enumerate(members):
            train_rows, val_rows = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            calib = np.sort(rng.choice(train_rows, size=min(CALIBRATION_IMAGES, len(train_rows)), replace=False))
            fp32_path, int8_path = Path(tmp) / f"m{k}.onnx", Path(tmp) / f"m{k}.int8.onnx"
            export_onnx([member], spec, images[calib[:16]], fp32_path, tta, log=lambda m: None)
            quantize_member(fp32_path, images[calib], spec, int8_path)
            a = run_graph(session(fp32_path), images[val_rows], spec)
            b = run_graph(session(int8_path), images[val_rows], spec)
            fp32_oof[val_rows], int8_oof[val_rows] = a, b
            agree = float(np.mean(a.argmax(1) == b.argmax(1)))
            figures.append(dict(fold=k, images=len(val_rows), agreement=agree, max_abs_diff=float(np.abs(a - b).max())))
            log(f"int8: fold {k} model quantized; top-1 agreement with fp32 on its fold {agree:.4f}")
            paths.append(int8_path)
        if out is not None:
            joined = join_members(paths)
            atomic_write(out, lambda p: onnx.save(joined, str(p)))
    gate = gate_figures(y, fp32_oof, int8_oof, figures)
    verdict = "passed" if gate.passed else "FAILED (the bundle will serve fp32)"
    log(
        f"int8 gate {verdict}: top-1 agreement {gate.agreement:.4f} (>= {MIN_AGREEMENT}), malignant AUC "
        f"{gate.int8['malignant_auc']:.4f} vs {gate.fp32['malignant_auc']:.4f}, pAUC "
        f"{gate.int8['malignant_pauc']:.4f} vs {gate.fp32['malignant_pauc']:.4f} (max drop {MAX_METRIC_DROP})"
    )
    return gate


def quantize_refit(
    gate: QuantizationGate, fp32_path: Path, images: np.ndarray, spec: ImageSpec, out: Path, seed: int
) -> QuantizationGate:
    """Quantize the refit model into `out`. It has no out-of-fold images: the fold models' gate
    stands for the recipe, and the refit's own int8 graph must also agree with its fp32 graph,
    measured on every image (its training images) and held to the same threshold."""
    rng = np.random.default_rng(seed)
    calibration = images[np.sort(rng.choice(len(images), size=min(CALIBRATION_IMAGES, len(images)), replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "refit.int8.onnx"
        quantize_member(fp32_path, calibration, spec, int8_path)
        a, b = run_graph(session(fp32_path), images, spec), run_graph(session(int8_path), images, spec)
        agreement = float(np.mean(a.argmax(1) == b.argmax(1)))
        atomic_write(out, lambda p: shutil.copyfile(int8_path, p))
    passed = gate.passed and agreement >= gate.min_agreement
    return gate.model_copy(update={"served_model": "refit", "served_agreement": agreement, "passed": passed})


def gate_figures(
    y: np.ndarray, fp32: np.ndarray, int8: np.ndarray, members: list[dict] | None = None
) -> QuantizationGate:
    """The gate on out-of-fold probabilities of the fp32 and int8 fold models."""
    keys = ("malignant_auc", "malignant_pauc")
    a, b = all_metrics(y, fp32), all_metrics(y, int8)
    agreement = float(np.mean(fp32.argmax(1) == int8.argmax(1)))
    passed = agreement >= MIN_AGREEMENT and all(a[k] - b[k] <= MAX_METRIC_DROP for k in keys)
    return QuantizationGate(
        passed=passed,
        images=len(y),
        agreement=agreement,
        min_agreement=MIN_AGREEMENT,
        max_metric_drop=MAX_METRIC_DROP,
        fp32={k: a[k] for k in keys},
        int8={k: b[k] for k in keys},
        members=members or [],
    )
