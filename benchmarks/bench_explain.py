"""What explanations cost, side by side in one run.

python -m benchmarks.bench_explain --bundle RUN/bundle --data-dir DIR [--requests 40]

1. POST /predict (in-process app, one image with metadata) plain vs with explain=true
   (heatmap + TreeSHAP of every booster), alternating, median latency of each;
2. the CNN graph alone: probabilities only vs probabilities + embedding + logits (what every
   request now reads for its out-of-distribution score), batch 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import machine_header
from service.core.graph import OOD_OUTPUTS
from service.core.predictor import Predictor
from service.core.preprocess import load_for_model
from training.data.ham10000 import load_dataset

META = json.dumps({"age": 55, "sex": "female", "localization": "back"})


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--requests", type=int, default=40)
    args = p.parse_args()
    print(machine_header(), flush=True)
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.settings import Settings

    path = Path(load_dataset(args.data_dir, log=lambda m: None).table.path.iloc[0])
    files = {"image": (path.name, path.read_bytes(), "image/jpeg")}
    with TestClient(create_app(Settings(bundle=args.bundle))) as client:
        plain = lambda: client.post("/predict", files=files, data={"metadata": META}).raise_for_status()  # noqa: E731
        explain = lambda: client.post("/predict?explain=true", files=files, data={"metadata": META}).raise_for_status()  # noqa: E731
        for f in (plain, explain):
            f()
        a, b = [], []
        for _ in range(args.requests // 5):  # alternate, so drift on a shared machine hits both alike
            a.append(median_ms(plain, 5))
            b.append(median_ms(explain, 5))
        plain_ms, explain_ms = float(np.median(a)), float(np.median(b))

    predictor = Predictor.load(args.bundle)
    image = load_for_model(path.read_bytes(), predictor.manifest.preprocessing)[None]
    graph = lambda: predictor.cnn_outputs(image)  # noqa: E731
    with_ood = lambda: predictor.cnn_outputs(image, OOD_OUTPUTS)  # noqa: E731
    for g_ in (graph, with_ood):
        g_()
    g = [(median_ms(graph, 10), median_ms(with_ood, 10)) for _ in range(5)]
    g0, g1 = float(np.median([x for x, _ in g])), float(np.median([y for _, y in g]))

    m = predictor.manifest
    print(
        f"bundle {m.bundle_id}: {m.preprocessing.width}x{m.preprocessing.height}, {m.cnn.precision} CNN, boosters "
        f"{', '.join(b.name for b in m.boosters)}"
    )
    print(
        f"POST /predict: plain {plain_ms:.1f} ms, explain=true {explain_ms:.1f} ms (median): ratio {explain_ms / plain_ms:.2f}"
    )
    print(f"CNN graph, batch 1: probabilities {g0:.2f} ms, + embedding and logits {g1:.2f} ms: ratio {g1 / g0:.2f}")


if __name__ == "__main__":
    main()
