"""Prometheus metrics, one registry per app (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


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

    def observe_batch(self, images: int, seconds: float) -> None:
        self.inference.observe(seconds)
        self.batch_size.observe(images)
        self.images.inc(images)
