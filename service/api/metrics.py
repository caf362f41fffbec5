"""Prometheus metrics, one registry per app (no process-global state).

With several uvicorn workers, each is its own process: `python -m service` then points every
worker at one PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode), so whichever
worker answers a scrape reports the whole server's traffic, summed over the workers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from service.api.monitoring import DriftWindow
from service.core.answers import Answer, malignant_probability, ood_verdict, top_label
from service.core.manifest import Manifest
from service.core.predictor import Prediction

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def image_key(image: np.ndarray) -> bytes:
    """A digest of one model input: equal for the same pixels, whatever file they came in."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    def __init__(self, drift_window: int = 500) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lesion_http_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lesion_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.inference = Histogram(
            "lesion_model_inference_seconds",
            "Model time per micro-batch (CNN + boosters + stack)",
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.batch_size = Histogram(
            "lesion_model_batch_images",
            "Images per model call: concurrent requests gathered by the micro-batcher",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.images = Counter("lesion_images_predicted_total", "Images predicted", registry=self.registry)
        self.inflight_requests = Gauge(
            "lesion_inflight_requests",
            "Requests with a body admitted and not yet answered (each worker bounded by LESION_MAX_INFLIGHT_REQUESTS)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.inflight_bytes = Gauge(
            "lesion_inflight_body_bytes",
            "What the admitted requests' bodies cost in memory so far (each worker bounded by LESION_MAX_INFLIGHT_BYTES)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "lesion_model_info",
            "1 for the bundle a worker serves (label bundle_id), 0 once it stopped serving it",
            ["bundle_id"],
            registry=self.registry,
            multiprocess_mode="livemax",  # across live workers: 1 if any serves it
        )
        # what the model answers (as trained: the balanced prior), per bundle
        self.answers = Counter(
            "lesion_answers_total", "Answers by bundle and top-1 class", ["bundle_id", "label"], registry=self.registry
        )
        self.ood_flagged = Counter(
            "lesion_ood_flagged_total",
            "Answers flagged out-of-distribution (by either check)",
            ["bundle_id"],
            registry=self.registry,
        )
        self.quality_warned = Counter(
            "lesion_quality_warned_total",
            "Answers with an image-quality warning",
            ["bundle_id"],
            registry=self.registry,
        )
        self.malignant = Histogram(
            "lesion_malignant_probability",
            "The answers' malignant probability (mel + bcc + akiec)",
            ["bundle_id"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        )
        self.triage = Counter(
            "lesion_triage_total",
            "Triage decisions by bundle, operating point and decision (refer, routine, not-triaged)",
            ["bundle_id", "point", "decision"],
            registry=self.registry,
        )
        self.expected_referral = Gauge(
            "lesion_triage_expected_referral_share",
            "The share of images each triage point referred where it was measured (the bundle's monitoring baseline)",
            ["bundle_id", "point"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.ood_design_share = Gauge(
            "lesion_ood_design_share",
            "The share of real images the bundle's OOD flag was set to fire on",
            ["bundle_id"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.drift = Gauge(
            "lesion_drift_psi",
            "Population stability index of this worker's last answers against the bundle's out-of-fold baseline "
            "(signal: label = top-1 class shares, ood_score = the OOD score's deciles)",
            ["bundle_id", "signal"],
            registry=self.registry,
            multiprocess_mode="liveall",  # one series per live worker (pid): each estimates the same drift
        )
        self.drift_window = drift_window
        self.windows: dict[str, DriftWindow] = {}  # bundle id -> its window (the current bundle's only)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.inference.observe(seconds)
        self.batch_size.observe(images)
        self.images.inc(images)

    def observe_answers(
        self,
        manifest: Manifest,
        preds: list[Prediction],
        quality: list[list[str]],
        images: np.ndarray | None = None,
    ) -> None:
        """Count what the model answered and move the drift window (on the event loop: no lock); the
        drift window counts each of `images` (the model's inputs) once while it holds it."""
        bundle = manifest.bundle_id
        window = self.windows.get(bundle)
        if window is None:  # the first answer of this bundle in this worker
            window = self.windows[bundle] = DriftWindow(manifest, self.drift_window)
            for old in list(self.windows)[:-2]:  # during a swap both bundles answer: keep both windows
                del self.windows[old]
            if manifest.ood is not None:
                self.ood_design_share.labels(bundle).set(manifest.ood.flag_share)
            for point, share in (manifest.monitoring.referral_shares if manifest.monitoring else {}).items():
                self.expected_referral.labels(bundle, point).set(share)
        keys = [None] * len(preds) if images is None else [image_key(image) for image in images]
        for pred, warned, key in zip(preds, quality, keys):
            label = top_label(manifest, pred.probabilities)
            self.answers.labels(bundle, label).inc()
            self.malignant.labels(bundle).observe(malignant_probability(manifest, pred.probabilities))
            if warned:
                self.quality_warned.labels(bundle).inc()
            if (verdict := ood_verdict(manifest, pred)) is not None and verdict.flagged:
                self.ood_flagged.labels(bundle).inc()
            window.add(manifest.classes.index(label), pred.ood_score, key)
        for signal, value in (("label", window.label_psi()), ("ood_score", window.ood_psi())):
            if value is not None:
                self.drift.labels(bundle, signal).set(value)

    def observe_triage(self, manifest: Manifest, answers: Iterable[Answer]) -> None:
        """Count each answer's triage decision at the point it was decided at."""
        for a in answers:
            if a.triage is not None:
                self.triage.labels(manifest.bundle_id, a.triage.point.name, a.triage.decision).inc()

    def serving(self, bundle_id: str, previous: str | None = None) -> None:
        if previous is not None and previous != bundle_id:
            self.model_info.labels(bundle_id=previous).set(0)
            for signal in ("label", "ood_score"):  # no longer served: its drift is no one's alert
                self.drift.labels(previous, signal).set(float("nan"))
            self.windows.pop(previous, None)
        self.model_info.labels(bundle_id=bundle_id).set(1)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's in multiprocess mode."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def worker_stopped(self) -> None:
        """Drop this worker's live gauges from the shared files (multiprocess mode)."""
        if multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())
