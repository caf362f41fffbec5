"""The service's one settings object: command-line flags or LESION_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.preprocess import DEFAULT_MAX_PIXELS

BATCH_ROUTE = "/predict/batch"
BODY_ROUTES = (BATCH_ROUTE, "/predict", "/v2/models/lesion/infer")  # the routes that take a body
BINARY_HEADER = "Inference-Header-Content-Length"  # the Open Inference Protocol's binary extension


def is_infer_route(path: str) -> bool:
    """The Open Inference Protocol's infer route (routes/inference.py), versioned or not."""
    return path.startswith("/v2/models/") and path.endswith("/infer")


WORKER_SETTINGS_ENV = "LESION_WORKER_SETTINGS"  # the resolved Settings, as JSON, for uvicorn's worker processes


class ThreadBudget(NamedTuple):
    """Threads one worker may use, sized together so that the workers fill the cores and no more."""

    onnxruntime: int  # the CNN's intra-op threads: the heavy part of every model call
    boosters: int  # per booster call: small batches are fastest on one thread
    decode: int  # images decoded at once (in the request thread pool)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LESION_")

    bundle: Path = Field(Path("bundle"), description="model bundle directory")
    public_key: Path | None = Field(None, description="Ed25519 public key (PEM): refuse unsigned or altered bundles")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own model copy")
    ort_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = CPU cores / workers")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="per image file; larger gets 413")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="decoded pixels per image; more gets 413")
    max_request_pixels: int = Field(4 * DEFAULT_MAX_PIXELS, ge=1, description="decoded pixels per request")
    max_batch: int = Field(32, ge=1, description="images per /predict/batch request")
    max_batch_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="all the image files of one /predict/batch request; larger gets 413"
    )
    max_inflight_requests: int = Field(
        64,
        ge=1,
        description="requests with a body that one worker holds at once (reading, queued, predicting); more get 503",
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="memory one worker's request bodies may take at once (body bytes x the route's cost, "
        "Settings.body_cost); more get 503 (worst-case memory: docs/api.md, Admission)",
    )
    batch_max_size: int = Field(16, ge=1, description="micro-batching: most images in one model call")
    batch_max_wait_ms: float = Field(
        0.0, ge=0, description="micro-batching: how long a model call may wait for more requests; 0 = take what queued"
    )
    cnn_precision: Literal["auto", "fp32"] = Field(
        "auto", description="auto: the bundle's CNN (int8 when it passed its gate); fp32: its fp32 graph, if bundled"
    )
    booster_threads: int = Field(1, ge=1, description="threads per booster call")
    drift_window: int = Field(
        500, ge=10, description="answers per worker the drift gauges compare with the bundle's out-of-fold baseline"
    )
    max_metadata_bytes: int = Field(16 * 1024, ge=2, description="the metadata form field")
    decode_slots: int = Field(0, ge=0, description="images decoded at once per worker; 0 = CPU cores / workers")
    api_key: str | None = Field(None, description="if set, every route but health, docs and the page needs X-API-Key")
    admin_key: str | None = Field(
        None, description="if set, POST /admin/bundle works with this X-Admin-Key; else it is off"
    )
    bundles_root: Path | None = Field(
        None, description="POST /admin/bundle may load bundles under this folder; unset: only the configured bundle"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must keep arriving: max seconds between chunks"
    )
    body_deadline_s: float = Field(60.0, gt=0, description="a whole request body must arrive within this")
    header_timeout_s: float = Field(10.0, gt=0, description="max seconds for a request's headers to arrive")
    keepalive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    close_linger_s: float = Field(
        2.0,
        ge=0,
        le=30,
        description="after an answer that closes the connection (a 408, a 413), how long the client's further "
        "bytes are read and dropped, so that the answer reaches it instead of a connection reset",
    )
    log_level: str = "info"
    log_json: bool = Field(False, description="log JSON lines instead of text")
    log_client_address: bool = Field(False, description="include the client's address in request log lines")

    def cores_per_worker(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)

    def thread_budget(self) -> ThreadBudget:
        """Split the cores between workers so they do not oversubscribe the CPU. One model call runs
        at a time per worker (the micro-batcher), so the CNN may use all of the worker's cores."""
        cores = self.cores_per_worker()
        return ThreadBudget(self.ort_threads or cores, self.booster_threads, self.decode_slots or cores)

    def max_request_bytes(self, path: str = BATCH_ROUTE) -> int:
        """The largest body a route accepts: its images plus the form's other fields (the protocol's
        infer route: a metadata entry per image)."""
        infer = is_infer_route(path)
        images = None
        if path == BATCH_ROUTE or infer:
            images = min(self.max_batch * self.max_upload_bytes, self.max_batch_bytes)
        fields = (self.max_batch if infer else 2) * self.max_metadata_bytes
        return (images or self.max_upload_bytes) + fields + 64 * 1024

    @staticmethod
    def body_cost(path: str, binary: bool = False) -> float:
        """Bytes of worker memory one body byte may cost until its images are decoded, counted
        against max_inflight_bytes: a form's files are read once from the parser's spooled copies
        (1); the protocol's infer body is held while its images are copied out (binary extension: 2)
        or while its JSON is parsed, which makes each string twice before the body is freed (JSON:
        a peak of 3.13 measured on 8 base64 images, so 3.25)."""
        if not is_infer_route(path):
            return 1
        return 2 if binary else 3.25

    def largest_body_bytes(self) -> int:
        """The largest body any route accepts."""
        return max(self.max_request_bytes(p) for p in BODY_ROUTES)

    def largest_request_bytes(self) -> int:
        """The most in-flight memory one request of any route may cost (its largest body, weighted)."""
        return max(int(self.max_request_bytes(p) * self.body_cost(p)) for p in BODY_ROUTES)

    @model_validator(mode="after")
    def _one_request_fits_in_flight(self) -> Settings:
        if self.largest_request_bytes() > self.max_inflight_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must hold one largest request "
                f"({self.largest_request_bytes()} bytes as held, Settings.body_cost): raise it or lower "
                "max_batch_bytes / max_upload_bytes"
            )
        return self

    @classmethod
    def for_worker(cls) -> Settings:
        """In a worker `python -m service` started: exactly the settings it resolved (flags and
        variables), so no setting is read a second way; elsewhere, from the LESION_* variables."""
        resolved = os.environ.get(WORKER_SETTINGS_ENV)
        return cls.model_validate_json(resolved) if resolved else cls()

    def public_key_pem(self) -> bytes | None:
        return self.public_key.read_bytes() if self.public_key else None
