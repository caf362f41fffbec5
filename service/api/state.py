"""The one piece of mutable state: the bundle, verified at start-up and loaded in a thread."""

from __future__ import annotations

import logging

import numpy as np

from service.api.settings import Settings
from service.core.bundle import read_manifest, verify_bundle
from service.core.manifest import Manifest
from service.core.predictor import Predictor

log = logging.getLogger("service")


class ModelState:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.manifest: Manifest | None = None
        self.error: str | None = None

    def verify(self, settings: Settings) -> None:
        """Manifest, sha256 of every file and library versions; BundleError stops start-up."""
        manifest = read_manifest(settings.bundle)
        verify_bundle(settings.bundle, manifest)
        self.manifest = manifest

    def load(self, settings: Settings) -> None:
        """onnxruntime session, unpickling and a warm-up; run in a thread after `verify`."""
        try:
            predictor = Predictor.load(settings.bundle, intra_op_threads=settings.intra_op_threads(), verify=False)
            spec = predictor.manifest.preprocessing
            predictor.predict(np.full((1, spec.height, spec.width, 3), 128, np.uint8), [None])  # warm-up
            self.predictor = predictor
            log.info("model %s loaded and warmed up", predictor.manifest.bundle_id)
        except Exception as exc:  # anything here means we must never report ready
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.error)
