"""int8 CNN, accuracy-aware: quantized layer by layer less until the served answer keeps its accuracy.

Each fold model is exported alone, quantized with onnxruntime's static quantization (calibrated on
images of its own training folds) and run beside its fp32 graph on the fold it never saw. Both
sets of out-of-fold CNN probabilities go through the rest of the served pipeline (the fold's
boosters, the soft vote, the stack: `training.ensemble.served`), and int8 passes when the served
answer's BMCA, malignant AUC and malignant pAUC each lose at most 1 % relative to fp32 on the same
images, the criterion of accuracy-aware tuners such as Intel Neural Compressor. When it fails, the
next configuration of `LADDER` keeps more of the most sensitive layers (the first convolution,
then the last residual block) in fp32 and the check runs again; the first configuration that
passes is served (`training.stages.quantize`). Top-1 agreement is reported, never decisive: an
unsure 7-class CNN flips its top class on small changes that the answer does not feel.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import compose, helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.core.graph import INPUT_NAME, OUTPUT_NAME
from service.core.manifest import GateCheck, GateMetric, QuantizationAttempt, QuantizationGate
from service.core.preprocess import ImageSpec, to_model_input
from training.cnn.onnx import export_onnx
from training.evaluation.metrics import with_intervals

MAX_RELATIVE_LOSS = 0.01  # each gated figure of the served answer may lose at most 1 % of its fp32 value
GATED = ("bmca", "malignant_auc", "malignant_pauc")
RULE = (
    f"int8 is served when the served answer's {', '.join(GATED)} each lose at most "
    f"{MAX_RELATIVE_LOSS:.0%} relative to fp32 on the same out-of-fold images (and, for a refit CNN, on its "
    "own training images); configurations are tried in order, keeping more layers in fp32"
)
CALIBRATION_IMAGES = 256  # per fold model, from its training folds
# uint8 activations, int8 weights with reduce_range (7-bit): AVX2 CPUs without VNNI compute
# u8 x s8 products with 16-bit saturation, and full-range weights overflow it. Measured on fold 2 of
# a cpu-preset run: top-1 agreement with fp32 0.991 with reduce_range vs 0.974 without it (and
# 0.974 for u8 weights, 0.974 for percentile calibration), at the same speed.
# Only the convolutional trunk is quantized: the classifier layer and the softmax stay fp32, so
# probabilities keep their full resolution (8-bit probabilities would round small ones to 0).
# Clip (EfficientNet-Lite0's ReLU6) is listed so onnxruntime folds it into the convolution's output
# range, [0, 6], instead of quantizing the unclipped output: on the smoke-preset Lite0, top-1
# agreement with fp32 rose from 0.60 to 0.74 on 400 sample images (the ResNet-18, which has no Clip,
# stayed at 0.99). Lite0 still fails its gate there; the gate decides.
QUANT_OPTIONS = dict(
    quant_format=QuantFormat.QOperator,
    activation_type=QuantType.QUInt8,
    weight_type=QuantType.QInt8,
    reduce_range=True,
    per_channel=True,
    op_types_to_quantize=["Conv", "Add", "MaxPool", "GlobalAveragePool", "Clip"],
)


def first_convolution(graph: onnx.GraphProto) -> list[str]:
    return [next(n.name for n in graph.node if n.op_type == "Conv")]


# how exported node names show a stage (its pattern, and its name given the number): torchvision's
# ResNet, timm's EfficientNet
STAGE_NAMES = ((r"/layer(\d+)/", "/layer{}/"), (r"/blocks\.(\d+)/", "/blocks.{}/"))


def last_block(graph: onnx.GraphProto) -> list[str]:
    """The nodes of the last stage (torchvision's ResNet names them /layer4/..., timm's EfficientNet
    /blocks.6/...) and the pooling that reads it; the last convolution when the graph has no such stages."""
    for pattern, name in STAGE_NAMES:
        stages = {int(m.group(1)) for n in graph.node if (m := re.search(pattern, n.name))}
        if stages:
            last = name.format(max(stages))
            return [n.name for n in graph.node if last in n.name or n.op_type == "GlobalAveragePool"]
    return [[n.name for n in graph.node if n.op_type == "Conv"][-1]]


@dataclass(frozen=True)
class Rung:
    """One int8 configuration: a name, and the nodes of a (pre-processed) graph it keeps in fp32."""

    name: str
    keep_fp32: Callable[[onnx.GraphProto], list[str]]


LADDER = [
    Rung("every convolution int8", lambda g: []),
    Rung("first convolution fp32", first_convolution),
    Rung("first convolution and last residual block fp32", lambda g: first_convolution(g) + last_block(g)),
]


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


def run_graph(model: str | Path | bytes, images: np.ndarray, spec: ImageSpec, batch: int = 128) -> np.ndarray:
    sess = session(model)
    out = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: to_model_input(images[i : i + batch], spec)})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out).astype(np.float64)


def quantize_member(fp32_path: Path, calibration: np.ndarray, spec: ImageSpec, out: Path, rung: Rung) -> list[str]:
    """Static int8 quantization of one exported model, calibrated on `calibration` images, with the
    nodes `rung` names left in fp32. Returns those nodes."""
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))  # shape inference + graph optimisation, as ORT recommends
    keep = rung.keep_fp32(onnx.load(str(pre)).graph)
    quantize_static(str(pre), str(out), Images(calibration, spec), nodes_to_exclude=keep, **QUANT_OPTIONS)
    pre.unlink()
    return keep


def calibration_rows(rows: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(CALIBRATION_IMAGES, len(rows)), replace=False))


class FoldGraphs:
    """The fold models exported one by one into `folder`, with their fp32 out-of-fold probabilities;
    `quantize(rung)` gives the int8 ones of a configuration, `served(gate)` the graphs the gate serves."""

    def __init__(
        self,
        members: list[torch.nn.Module],
        images: np.ndarray,
        fold: np.ndarray,
        spec: ImageSpec,
        folder: Path,
        seed: int,
        tta: bool = False,
    ) -> None:
        self.images, self.fold, self.spec, self.folder = images, fold, spec, folder
        self.calibration = [calibration_rows(np.flatnonzero(fold != k), seed) for k in range(len(members))]
        self.fp32 = np.zeros((len(images), 0))
        for k, member in enumerate(members):
            path = self.fp32_path(k)
            # with the explanation outputs, as the served graph has them: the OOD fit reads them too
            export_onnx([member], spec, images[self.calibration[k][:16]], path, tta, log=lambda m: None, explain=True)
            probs = run_graph(path, images[fold == k], spec)
            if k == 0:
                self.fp32 = np.zeros((len(images), probs.shape[1]))
            self.fp32[fold == k] = probs

    def fp32_path(self, k: int) -> Path:
        return self.folder / f"fold{k}.onnx"

    def served(self, gate: QuantizationGate | None) -> tuple[np.ndarray, list[Path]]:
        """The fold graphs at the precision the bundle serves (the gate's passing configuration, else
        fp32), and their out-of-fold probabilities."""
        if gate is None or not gate.passed:
            return self.fp32, [self.fp32_path(k) for k in range(len(self.calibration))]
        index = next(i for i, rung in enumerate(LADDER) if rung.name == gate.config)
        int8, paths, _ = self.quantize(LADDER[index], index)
        return int8, paths

    def quantize(self, rung: Rung, index: int) -> tuple[np.ndarray, list[Path], list[str]]:
        """Every fold model quantized with `rung`: their out-of-fold probabilities, graphs, fp32 nodes."""
        int8, paths = np.zeros_like(self.fp32), []
        for k, calib in enumerate(self.calibration):
            paths.append(self.folder / f"fold{k}.rung{index}.int8.onnx")
            keep = quantize_member(self.fp32_path(k), self.images[calib], self.spec, paths[-1], rung)
            int8[self.fold == k] = run_graph(paths[-1], self.images[self.fold == k], self.spec)
        return int8, paths, keep


def gate_check(
    y: np.ndarray,
    lesions: np.ndarray,
    cnn: tuple[np.ndarray, np.ndarray],
    answer: tuple[np.ndarray, np.ndarray],
    n_boot: int,
    seed: int,
) -> GateCheck:
    """The rule on (fp32, int8) pairs of CNN probabilities and served answers for the same images."""
    figures = with_intervals(y, {"fp32": answer[0], "int8": answer[1]}, lesions, n_boot, seed, paired=("int8", "fp32"))
    metrics = {}
    for k in GATED:
        a, b = figures["models"]["fp32"][k]["value"], figures["models"]["int8"][k]["value"]
        loss = a - b
        relative = loss / a if a > 0 else float(loss > 0)  # a zero fp32 figure can only be kept
        metrics[k] = GateMetric(
            fp32=a, int8=b, relative_loss=relative, difference_ci95=figures["paired_difference"][k]["ci95"]
        )
    return GateCheck(
        images=len(y),
        passed=all(m.relative_loss <= MAX_RELATIVE_LOSS for m in metrics.values()),  # NaN fails
        metrics=metrics,
        cnn_agreement=agreement(*cnn),
        answer_agreement=agreement(*answer),
    )


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def describe(check: GateCheck) -> str:
    figures = ", ".join(f"{k} {m.fp32:.4f} -> {m.int8:.4f} ({-m.relative_loss:+.2%})" for k, m in check.metrics.items())
    return f"{'passed' if check.passed else 'failed'}: {figures}; top-1 agreement CNN {check.cnn_agreement:.4f}"


def tune(
    graphs: FoldGraphs,
    y: np.ndarray,
    lesions: np.ndarray,
    answer: Callable[[np.ndarray], np.ndarray],
    n_boot: int,
    seed: int,
    refit: Callable[[Rung, int], GateCheck] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[QuantizationAttempt], list[list[Path]]]:
    """Try `LADDER` in order until a configuration passes: the fold models' int8 out-of-fold
    probabilities through `answer` (CNN probabilities -> the served answer, for every row) against
    the fp32 ones, and then `refit(rung, index)`, the refit model's own check, when it serves.

    Returns every attempt and each one's int8 fold graphs (in `graphs.folder`)."""
    fp32_answer = answer(graphs.fp32)
    attempts: list[QuantizationAttempt] = []
    fold_graphs = []
    for i, rung in enumerate(LADDER):
        int8, paths, keep = graphs.quantize(rung, i)
        folds = gate_check(y, lesions, (graphs.fp32, int8), (fp32_answer, answer(int8)), n_boot, seed)
        log(f"int8 [{rung.name}] fold models, served answer out-of-fold: {describe(folds)}")
        own = refit(rung, i) if refit is not None and folds.passed else None
        if own is not None:
            log(f"int8 [{rung.name}] refit model, served answer on its training images: {describe(own)}")
        attempts.append(QuantizationAttempt(config=rung.name, fp32_nodes=keep, folds=folds, refit=own))
        fold_graphs.append(paths)
        if attempts[-1].passed:
            break
    return attempts, fold_graphs


def gate_of(attempts: list[QuantizationAttempt], served_model: str, answer: str) -> QuantizationGate:
    """The gate as the manifest records it: the first passing configuration, else the last tried."""
    chosen = next((a for a in attempts if a.passed), attempts[-1])
    return QuantizationGate(
        passed=chosen.passed,
        images=chosen.folds.images,
        agreement=chosen.folds.cnn_agreement,
        served_model=served_model,
        rule=RULE,
        max_relative_loss=MAX_RELATIVE_LOSS,
        answer=answer,
        config=chosen.config,
        fp32_nodes=chosen.fp32_nodes,
        attempts=attempts,
    )


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
