"""The CNN graph's contract: the names export writes and serving reads, and what a graph with given
outputs can do. One module, imported by both sides (training/cnn/onnx.py and the Predictor)."""

from __future__ import annotations

from collections.abc import Iterable

INPUT_NAME = "image"  # normalised float32 images, NCHW
OUTPUT_NAME = "probabilities"  # (N, C), the answer
CAM, EMBEDDING, LOGITS = "cam", "embedding", "logits"  # class activation maps (N,C,h,w), (N,512), (N,C)
EXPLAIN_OUTPUTS = (CAM, EMBEDDING, LOGITS)  # with explain=True, after OUTPUT_NAME (FoldEnsemble's order)
OOD_OUTPUTS = (EMBEDDING, LOGITS)  # what the out-of-distribution score reads


def can_explain(outputs: Iterable[str]) -> bool:
    """A graph with these further outputs can draw heatmaps."""
    return CAM in set(outputs)


def can_score_ood(outputs: Iterable[str]) -> bool:
    """A graph with these further outputs gives what the out-of-distribution score reads."""
    return set(OOD_OUTPUTS) <= set(outputs)
