"""Serving cost of a bundle, measured side by side in one run.

python -m benchmarks.bench_inference --bundle runs/x/bundle [--image IMG] [--rounds 20]
Prints: the full stack per image vs the CNN alone; one fold model vs the fold ensemble (the
bundle's ONNX graph); batch-of-16 vs one-by-one throughput. Ratios are what to read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import machine_header
from service.core.manifest import CnnModel
from service.core.metadata import ClinicalMetadata
from service.core.predictor import Predictor, limit_numpy_blas
from service.core.preprocess import load_for_model, to_model_input


def timed(fn, rounds: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t) / rounds


def graph_images_per_s(graph: Path, x: np.ndarray, rounds: int, threads: int = 0) -> float:
    """Images/s of an ONNX graph on one batch of normalised images (threads 0: onnxruntime's default)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return len(x) / timed(lambda: sess.run(None, {name: x}), rounds)


def single_member(bundle: Path, cnn: CnnModel) -> ort.InferenceSession:
    """The ensemble graph cut down to its first member, for comparison."""
    model = onnx.load(str(bundle / cnn.file))
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"][0]
    model.graph.output[0].name = softmax.output[0]
    cut = onnx.utils.Extractor(model).extract_model([cnn.input_name], [softmax.output[0]])
    return ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(machine_header(), flush=True)
    pred = Predictor.load(args.bundle, intra_op_threads=args.threads)
    limit_numpy_blas(1)  # as the service does
    spec = pred.manifest.preprocessing
    data = args.image.read_bytes() if args.image else None
    img = load_for_model(data, spec) if data else np.full((spec.height, spec.width, 3), 128, np.uint8)
    meta = [ClinicalMetadata(age=50, sex="male", site="back")]
    x = to_model_input(img[None], spec)
    one = single_member(args.bundle, pred.manifest.cnn)
    t_stack = timed(lambda: pred.predict(img[None], meta), args.rounds)
    t_cnn = timed(lambda: pred.cnn_probs(img[None]), args.rounds)
    t_one = timed(lambda: one.run(None, {pred.manifest.cnn.input_name: x}), args.rounds)
    batch = np.repeat(img[None], 16, axis=0)
    t_batch = timed(lambda: pred.predict(batch, meta * 16), max(2, args.rounds // 4)) / 16
    print(
        f"bundle {pred.manifest.bundle_id}: {pred.manifest.cnn.members} fold models, {spec.width}x{spec.height}, {args.threads} ORT thread(s)"
    )
    print(f"one fold model: {1000 * t_one:.1f} ms   fold ensemble: {1000 * t_cnn:.1f} ms   ratio {t_cnn / t_one:.2f}")
    print(f"CNN alone: {1000 * t_cnn:.1f} ms   full stack: {1000 * t_stack:.1f} ms   ratio {t_stack / t_cnn:.2f}")
    print(
        f"one by one: {1000 * t_stack:.1f} ms/img   batch of 16: {1000 * t_batch:.1f} ms/img   speed-up {t_stack / t_batch:.2f}"
    )


if __name__ == "__main__":
    main()
