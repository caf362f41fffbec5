"""The same bundle behind BentoML: the peer `benchmarks/bench_serving.py --peer bentoml` measures.

Run by the benchmark from a venv of its own (BentoML is not a dependency of this project):
  LESION_BUNDLE=runs/x/bundle bentoml serve benchmarks.bentoml_peer:Api --port 3000
It takes the same multipart request as /predict (fields `image` and `metadata`) at /predict.

BentoML's own layout for adaptive batching: `Api` decodes the upload with the core's decoder and
calls `Model`, whose batchable `predict` runs the core's Predictor (CNN, boosters, stack, OOD
score) on what BentoML's dispatcher gathered. One worker each, as the service under test runs one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import bentoml
import numpy as np

BUNDLE = os.environ.get("LESION_BUNDLE", "bundle")
THREADS = int(os.environ.get("LESION_PEER_THREADS", str(os.cpu_count() or 1)))


@bentoml.service(workers=1)
class Model:
    def __init__(self) -> None:
        from service.core.predictor import Predictor, limit_numpy_blas

        self.predictor = Predictor.load(BUNDLE, intra_op_threads=THREADS)
        limit_numpy_blas(1)
        self.predictor.warm_up()

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=60_000)
    def predict(self, items: list[dict]) -> list[list[float]]:
        """Each item's served probabilities; an item is {"image": decoded HxWx3 uint8, "metadata": dict}
        (a batchable API takes one argument)."""
        preds = self.predictor.predict(np.stack([i["image"] for i in items]), [i["metadata"] for i in items])
        return [p.probabilities.tolist() for p in preds]


@bentoml.service(workers=1)
class Api:
    model = bentoml.depends(Model)

    def __init__(self) -> None:
        from service.core.bundle import read_manifest

        self.manifest = read_manifest(Path(BUNDLE))

    @bentoml.api
    async def predict(self, image: Path, metadata: dict | None = None) -> dict:  # BentoML parses the JSON field
        from service.core.preprocess import load_for_model

        # decoded in a thread, as the service under test decodes in its thread pool
        decoded = await asyncio.to_thread(load_for_model, image.read_bytes(), self.manifest.preprocessing)
        (probs,) = await self.model.to_async.predict([{"image": decoded, "metadata": metadata or {}}])
        classes = self.manifest.classes
        return {"label": classes[int(np.argmax(probs))], "probabilities": dict(zip(classes, probs))}
