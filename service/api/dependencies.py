"""FastAPI dependencies: the settings, the loaded bundle and the API key check."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request

from service.api.metrics import Metrics
from service.api.settings import Settings
from service.api.state import ModelState
from service.core.manifest import Manifest
from service.core.predictor import Predictor


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_state(request: Request) -> ModelState:
    return request.app.state.model


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_manifest(state: ModelState = Depends(get_state)) -> Manifest:
    if state.manifest is None:
        raise HTTPException(503, "the bundle is not verified yet")
    return state.manifest


def get_predictor(state: ModelState = Depends(get_state)) -> Predictor:
    if state.predictor is None:
        raise HTTPException(503, state.error and f"model failed to load: {state.error}" or "model is still loading")
    return state.predictor


def check_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    if settings.api_key and request.headers.get("x-api-key") != settings.api_key:
        raise HTTPException(401, "missing or wrong X-API-Key header")
