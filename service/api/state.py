"""The one piece of mutable state: the bundle, loaded before the worker accepts a connection."""

from __future__ import annotations

import logging
import threading

import numpy as np

from service.api.settings import Settings
from service.core.manifest import Manifest
from service.core.predictor import Predictor

log = logging.getLogger("service")


class ModelState:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.decode_slots = threading.BoundedSemaphore(1)  # sized to the cores in `load`

    @property
    def manifest(self) -> Manifest | None:
        return self.predictor.manifest if self.predictor else None

    def load(self, settings: Settings) -> None:
        """Verify and load the bundle, then warm it up. Runs in the lifespan, so a worker answers
        nothing until its model is ready (readiness never flaps with several workers); a bad bundle
        raises BundleError and stops the worker."""
        predictor = Predictor.load(
            settings.bundle, intra_op_threads=settings.intra_op_threads(), public_key_pem=settings.public_key_pem()
        )
        spec = predictor.manifest.preprocessing
        predictor.predict(np.full((1, spec.height, spec.width, 3), 128, np.uint8), [None])  # warm-up
        self.decode_slots = threading.BoundedSemaphore(settings.decode_slots or settings.cores_per_worker())
        self.predictor = predictor
        bundle_id = predictor.manifest.bundle_id
        log.info("model %s loaded and warmed up", bundle_id, extra={"bundle_id": bundle_id})
