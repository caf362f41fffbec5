"""The service's one settings object: command-line flags or LESION_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BATCH_ROUTE = "/predict/batch"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LESION_")

    bundle: Path = Field(Path("bundle"), description="model bundle directory")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own model copy")
    ort_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = CPU cores / workers")
    max_upload_bytes: int = Field(10 * 1024 * 1024, description="per image file; larger gets 413")
    max_pixels: int = Field(40_000_000, description="decoded image pixels; larger gets 413")
    max_batch: int = Field(32, ge=1, description="images per /predict/batch request")
    api_key: str | None = Field(None, description="if set, /predict* require header X-API-Key")
    log_level: str = "info"

    def intra_op_threads(self) -> int:
        """Split the cores between workers so they do not oversubscribe the CPU."""
        return self.ort_threads or max(1, (os.cpu_count() or 1) // self.workers)

    def max_request_bytes(self, path: str = BATCH_ROUTE) -> int:
        """The largest body a route accepts: its images plus 1 MiB for the form's other fields."""
        images = self.max_batch if path == BATCH_ROUTE else 1
        return self.max_upload_bytes * images + 1024 * 1024
