"""`python -m service --bundle DIR [--host H] [--port P] [--workers N]`; flags override LESION_* variables."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import uvicorn

from service.api.logs import log_config
from service.api.metrics import MULTIPROC_ENV
from service.api.protocol import HeaderDeadlineProtocol
from service.api.settings import WORKER_SETTINGS_ENV, Settings
from service.core.bundle import BundleError, read_manifest, verify_bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--bundle", help="model bundle directory (env LESION_BUNDLE)")
    parser.add_argument("--host", help="env LESION_HOST, default 127.0.0.1")
    parser.add_argument("--port", type=int, help="env LESION_PORT, default 8000")
    parser.add_argument("--workers", type=int, help="env LESION_WORKERS, default 1")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    try:  # fail fast, in one line, before any worker starts
        verify_bundle(settings.bundle, read_manifest(settings.bundle, settings.public_key_pem()))
    except (BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ[WORKER_SETTINGS_ENV] = settings.model_dump_json()  # each worker's Settings (Settings.for_worker)
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # one /metrics for all workers: they share this folder (prometheus-client multiprocess mode)
        metrics_dir = tempfile.mkdtemp(prefix="lesion-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        serve(settings)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def serve(settings: Settings) -> None:
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=HeaderDeadlineProtocol,  # each connection: the limits of its worker's app (Settings.for_worker)
        log_config=log_config(settings),
        access_log=False,  # the request guard logs one line per request, without client address or query
        timeout_keep_alive=settings.keepalive_timeout_s,
        timeout_graceful_shutdown=30,
        server_header=False,
    )


if __name__ == "__main__":
    sys.exit(main())
