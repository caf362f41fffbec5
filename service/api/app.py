"""The FastAPI app factory: `uvicorn service.api.app:create_app --factory` or `python -m service`.

The bundle is verified (signature if configured, sha256 of every file, format and library
versions) and loaded, and a warm-up inference run, in the lifespan: a worker accepts no
connection until its model is ready, and a bad bundle stops it. Request CPU work runs in the
thread pool; the loaded Predictor is read-only, so requests run concurrently without a lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from service.api import forms
from service.api.errors import install_error_handlers
from service.api.metrics import Metrics
from service.api.middleware import RequestGuard
from service.api.routes import admin, inference, operations, predictions
from service.api.settings import Settings
from service.api.state import ModelState
from service.core.bundle import BundleError

log = logging.getLogger("service")


def content_security_policy(*pages: str) -> str:
    """Scripts only from this origin or the exact inline scripts of our own pages (by sha256)."""
    scripts = [s for page in pages for s in re.findall(r"<script>(.*?)</script>", page, re.S)]
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def reload_on_sighup(state: ModelState, settings: Settings, metrics: Metrics) -> None:
    """SIGHUP to a worker: swap in the bundle at the configured path again (say, after the `current`
    link was pointed at a new bundle), as POST /admin/bundle does."""

    async def reload() -> None:
        try:
            old, new = await state.swap(settings, settings.bundle)
            metrics.serving(new, old)
            log.info("SIGHUP: now serving %s (was %s)", new, old, extra={"bundle_id": new})
        except (BundleError, OSError) as exc:
            log.error("SIGHUP: bundle %s refused, still serving the old one: %s", settings.bundle, exc)

    def on_sighup() -> None:
        task = asyncio.ensure_future(reload())
        state.tasks.add(task)  # a reference until it ends: the loop keeps only weak ones
        task.add_done_callback(state.tasks.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals off the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings`, which stay its own: nothing here is written process-wide per app.
    The connection limits (header deadline, lingering close) are read from `app.state.settings` by
    the protocol serving it (protocol.py), the multipart part limits and spool size from the request
    guard's per-request limits (forms.py)."""
    settings = settings or Settings.for_worker()
    logging.captureWarnings(True)  # a library's warning is a log line in the service's format, not raw stderr
    forms.install()  # the bounded multipart parser; the same for every app
    state, metrics = ModelState(), Metrics(settings.drift_window)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.load(settings)  # BundleError: this worker stops, nothing is served
        metrics.serving(state.predictor.manifest.bundle_id)  # type: ignore[union-attr]
        state.start_batcher(settings, metrics)
        reload_on_sighup(state, settings, metrics)
        yield
        await state.batcher.stop()  # type: ignore[union-attr]
        metrics.worker_stopped()

    app = FastAPI(
        title="Skin lesion classifier",
        version="2.0",
        description="ResNet-18 + gradient-boosted trees on clinical metadata, stacked. Research use only.",
        lifespan=lifespan,
        docs_url=None,  # served by the operations router from local files: the docs page works offline
        redoc_url=None,
        # the multipart parser stops at the (max_batch + 1)th file part, before buffering it
        form_limits={"max_files": settings.max_batch, "max_fields": 4},
    )
    app.state.settings, app.state.model, app.state.metrics = settings, state, metrics
    app.state.docs_html = operations.docs_page(app)
    headers = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": content_security_policy(operations.page_html(), app.state.docs_html),
    }
    app.mount(operations.DOCS_ASSETS, StaticFiles(directory=operations.SWAGGER_UI), name="docs-assets")
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics, state=state, security_headers=headers)
    install_error_handlers(app)
    app.include_router(operations.router)
    app.include_router(predictions.router)
    app.include_router(admin.router)
    app.include_router(inference.router)
    return app
