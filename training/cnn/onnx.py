"""Export the fold ensemble to ONNX and prove onnxruntime agrees with torch on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.core.graph import EXPLAIN_OUTPUTS, INPUT_NAME, OUTPUT_NAME
from service.core.preprocess import ImageSpec, to_model_input
from training.cnn.models import FoldEnsemble
from training.data.io import atomic_write
from training.errors import ExportError

PARITY_TOLERANCE = 1e-4


def export_onnx(
    members: list[torch.nn.Module],
    spec: ImageSpec,
    images: np.ndarray,
    out: Path,
    tta: bool = False,
    log=print,
    explain: bool = False,
) -> float:
    """Write `out` (input 'image' NCHW float32, output 'probabilities', dynamic batch); with `tta`
    the graph averages the 8 dihedral views of each image (`training.cnn.models.FoldEnsemble`); with
    `explain` it also outputs EXPLAIN_OUTPUTS: class activation maps, embedding and logits.

    `images` are real uint8 images (N,H,W,3); the run fails unless every output of onnxruntime
    matches torch's to PARITY_TOLERANCE. Returns the max abs difference.
    """
    model = FoldEnsemble([m.float().eval().cpu() for m in members], tta, explain).eval()
    x = torch.from_numpy(to_model_input(images, spec))
    outputs = [OUTPUT_NAME, *(EXPLAIN_OUTPUTS if explain else ())]
    with torch.no_grad():
        expected = model(x)
    expected = [t.numpy() for t in (expected if explain else (expected,))]

    result = {}

    def write(tmp: Path) -> None:
        torch.onnx.export(
            model,
            (x[:2],),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
            opset_version=17,
            dynamo=False,
        )
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(outputs, {INPUT_NAME: x.numpy()})
        # probabilities to PARITY_TOLERANCE; logits, embeddings and maps (values of order 10) relative to their scale
        diff = max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) for a, b in zip(got, expected))
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"onnxruntime differs from torch by {diff:.2e} (> {PARITY_TOLERANCE}) on real images")
        log(f"export: onnxruntime matches torch on {len(images)} real images (max abs diff {diff:.1e})")
        result["diff"] = diff

    atomic_write(out, write)
    return result["diff"]
