"""Prometheus metrics, one registry per app (no process-global state).

With several uvicorn workers, each is its own process: `python -m service` then points every
worker at one PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode), so whichever
worker answers a scrape reports the whole server's traffic, summed over the workers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    def __init__(self) -> None:
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
        self.model_info = Gauge(
            "lesion_model_info",
            "1 for the bundle a worker serves (label bundle_id), 0 once it stopped serving it",
            ["bundle_id"],
            registry=self.registry,
            multiprocess_mode="livemax",  # across live workers: 1 if any serves it
        )

    def observe_batch(self, images: int, seconds: float) -> None:
        self.inference.observe(seconds)
        self.batch_size.observe(images)
        self.images.inc(images)

    def serving(self, bundle_id: str, previous: str | None = None) -> None:
        if previous is not None and previous != bundle_id:
            self.model_info.labels(bundle_id=previous).set(0)
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
