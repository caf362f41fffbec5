"""The one piece of mutable state: the bundle, loaded before the worker accepts a connection."""

from __future__ import annotations

import logging
import threading

import numpy as np

from service.api.batching import MicroBatcher
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.core.manifest import Manifest
from service.core.predictor import Predictor

log = logging.getLogger("service")


class ModelState:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.decode_slots = threading.BoundedSemaphore(1)  # sized to the cores in `load`
        self.batcher: MicroBatcher | None = None

    @property
    def manifest(self) -> Manifest | None:
        return self.predictor.manifest if self.predictor else None

    def load(self, settings: Settings) -> None:
        """Verify and load the bundle, then warm it up. Runs in the lifespan, so a worker answers
        nothing until its model is ready (readiness never flaps with several workers); a bad bundle
        raises BundleError and stops the worker."""
        budget = settings.thread_budget()
        predictor = Predictor.load(
            settings.bundle,
            intra_op_threads=budget.onnxruntime,
            public_key_pem=settings.public_key_pem(),
            cnn_precision=settings.cnn_precision,
            model_threads=budget.boosters,
        )
        spec = predictor.manifest.preprocessing
        predictor.predict(np.full((1, spec.height, spec.width, 3), 128, np.uint8), [None])  # warm-up
        self.decode_slots = threading.BoundedSemaphore(budget.decode)
        self.predictor = predictor
        bundle_id = predictor.manifest.bundle_id
        log.info(
            "model %s loaded and warmed up (%s, threads: %s)",
            bundle_id,
            predictor.cnn_file,
            budget,
            extra={"bundle_id": bundle_id},
        )

    def predict(self, images: np.ndarray, metadata: list) -> list:
        """The loaded predictor, looked up on every call (not bound once when the batcher starts)."""
        assert self.predictor is not None
        return self.predictor.predict(images, metadata)

    def start_batcher(self, settings: Settings, metrics: Metrics) -> None:
        """In the running event loop, after `load`."""
        assert self.predictor is not None
        self.batcher = MicroBatcher(
            self.predict, settings.batch_max_size, settings.batch_max_wait_ms / 1000, metrics.observe_batch
        )
        self.batcher.start()
