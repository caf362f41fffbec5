"""FastAPI dependencies: the settings, the state, the metrics and the loaded bundle (access is
checked once, by the request guard: service/api/auth.py).

They are `async def` because none of them blocks: FastAPI runs a plain `def` dependency in its
thread pool, and those hops were about half of a /predict request's time outside the model.
"""

from __future__ import annotations

from fastapi import Depends, Request

from service.api.errors import ApiError
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.api.state import ModelState
from service.core.predictor import Predictor


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
