"""The FastAPI app factory: `uvicorn service.api.app:create_app --factory` or `python -m service`.

The bundle is verified (sha256 of every file, format and library versions) before the app
accepts a connection; a bad bundle stops start-up with a one-line error. The onnxruntime
session, the unpickling and a warm-up inference then run in a thread while /health/ready
answers 503. Request CPU work runs in the thread pool; the loaded Predictor is read-only,
so requests run concurrently without a lock.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.formparsers import MultiPartParser
from starlette.staticfiles import StaticFiles

from service.api.errors import install_error_handlers
from service.api.metrics import Metrics
from service.api.middleware import install_middleware
from service.api.routes import operations, predictions
from service.api.settings import Settings
from service.api.state import ModelState


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Keep uploads in memory: never spool them to a temporary file on disk.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_request_bytes())
    state, metrics = ModelState(), Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.verify(settings)  # BundleError: start-up fails, nothing is served
        threading.Thread(target=state.load, args=(settings,), daemon=True, name="bundle-loader").start()
        yield

    app = FastAPI(
        title="Skin lesion classifier",
        version="2.0",
        description="ResNet-18 + gradient-boosted trees on clinical metadata, stacked. Research use only.",
        lifespan=lifespan,
        docs_url=None,  # served by the operations router from local files: the docs page works offline
        redoc_url=None,
    )
    app.state.settings, app.state.model, app.state.metrics = settings, state, metrics
    app.mount(operations.DOCS_ASSETS, StaticFiles(directory=operations.SWAGGER_UI), name="docs-assets")
    install_middleware(app, settings, metrics)
    install_error_handlers(app)
    app.include_router(operations.router)
    app.include_router(predictions.router)
    return app
