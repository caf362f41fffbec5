"""The one piece of mutable state: the bundle, loaded before the worker accepts a connection, and
swapped for another one while serving (`swap`) without failing a request."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np

from service.api.batching import MicroBatcher
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.core.bundle import BundleError
from service.core.manifest import Manifest
from service.core.predictor import Predictor, limit_numpy_blas

log = logging.getLogger("service")


class ModelState:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.decode_slots = threading.BoundedSemaphore(1)  # sized to the cores in `load`
        self.batcher: MicroBatcher | None = None
        self.swap_lock = asyncio.Lock()  # one swap at a time
        self.tasks: set[asyncio.Task] = set()  # swaps started by a signal, until they end

    @property
    def manifest(self) -> Manifest | None:
        return self.predictor.manifest if self.predictor else None

    def load(self, settings: Settings) -> None:
        """Verify and load the bundle, then warm it up. Runs in the lifespan, so a worker answers
        nothing until its model is ready (readiness never flaps with several workers); a bad bundle
        raises BundleError and stops the worker."""
        self.predictor = self.loaded(settings, settings.bundle)
        self.decode_slots = threading.BoundedSemaphore(settings.thread_budget().decode)

    async def swap(self, settings: Settings, bundle: Path) -> tuple[str, str]:
        """Load and warm `bundle` beside the served one, then serve it: requests already accepted are
        answered by the bundle that accepted them, new ones by the new bundle. A bundle that fails
        to load or warm up raises BundleError and the old one keeps serving. Returns (old, new) ids."""
        async with self.swap_lock:
            new = await asyncio.get_running_loop().run_in_executor(None, self.loaded, settings, bundle)
            old, self.predictor = self.predictor, new  # one assignment: each request sees one or the other
            assert old is not None
            return old.manifest.bundle_id, new.manifest.bundle_id

    @staticmethod
    def loaded(settings: Settings, bundle: Path) -> Predictor:
        """A verified, loaded and warmed-up Predictor for `bundle` (BundleError if it is not one)."""
        budget = settings.thread_budget()
        try:
            predictor = Predictor.load(
                bundle,
                intra_op_threads=budget.onnxruntime,
                public_key_pem=settings.public_key_pem(),
                cnn_precision=settings.cnn_precision,
                model_threads=budget.boosters,
            )
        except (BundleError, OSError):
            raise
        except Exception as exc:  # whatever else a hostile bundle provokes is its fault, not a 500
            raise BundleError(f"{type(exc).__name__} while loading it: {str(exc)[:200]}") from None
        limit_numpy_blas(budget.boosters)  # for the process, once the bundle's libraries (and their BLAS) are loaded
        predictor.warm_up()
        bundle_id = predictor.manifest.bundle_id
        log.info(
            "model %s loaded and warmed up (%s, threads: %s)",
            bundle_id,
            ", ".join(predictor.cnn_files.values()),
            budget,
            extra={"bundle_id": bundle_id},
        )
        return predictor

    @staticmethod
    def predict(predictor: Predictor, images: np.ndarray, metadata: list) -> list:
        """The batcher's model call, on the predictor that accepted the requests."""
        return predictor.predict(images, metadata)

    def start_batcher(self, settings: Settings, metrics: Metrics) -> None:
        """In the running event loop, after `load`."""
        assert self.predictor is not None
        self.batcher = MicroBatcher(
            self.predict, settings.batch_max_size, settings.batch_max_wait_ms / 1000, metrics.observe_batch
        )
        self.batcher.start()
