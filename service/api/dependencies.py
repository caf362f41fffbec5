"""FastAPI dependencies: the settings, the loaded bundle and the API key check.

They are `async def` because none of them blocks: FastAPI runs a plain `def` dependency in its
thread pool, and those hops were about half of a /predict request's time outside the model.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.api.errors import ApiError
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.api.state import ModelState
from service.core.predictor import Predictor

API_KEY_HEADER = "X-API-Key"
ADMIN_KEY_HEADER = "X-Admin-Key"
ADMIN_PREFIX = "/admin/"
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when the service has a key")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_state(request: Request) -> ModelState:
    return request.app.state.model


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_predictor(state: ModelState = Depends(get_state)) -> Predictor:
    if state.predictor is None:
        raise ApiError(503, "not-ready", "model is still loading")
    if state.batcher is not None and not state.batcher.running:
        raise ApiError(503, "not-ready", "the model's batcher has stopped; this worker is not serving")
    return state.predictor


def key_is_valid(settings: Settings, sent: str | None) -> bool:
    """No key configured, or the sent one matches (constant-time comparison)."""
    if not settings.api_key:
        return True
    return matches(sent, settings.api_key)


def matches(sent: str | None, key: str) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode(), key.encode())


async def check_api_key(settings: Settings = Depends(get_settings), sent: str | None = Depends(api_key_header)) -> None:
    """Declares the key in the OpenAPI (the Authorize button of /docs); the request guard has already
    refused a wrong key before reading the body, so this is the same check a second time."""
    if not key_is_valid(settings, sent):
        raise ApiError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")
