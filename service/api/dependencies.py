"""FastAPI dependencies: the settings, the state, the metrics and the loaded bundle (access is
checked once, by the request guard: service/api/auth.py).

They are `async def` because none of them blocks: FastAPI runs a plain `def` dependency in its
thread pool, and those hops were about half of a /predict request's time outside the model.
"""

from __future__ import annotations

from typing import Annotated

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


def not_serving(state: ModelState) -> str | None:
    """Why this worker cannot answer a prediction now; None when it can (the one readiness test)."""
    if state.predictor is None:
        return "model is still loading"
    if state.batcher is None or not state.batcher.running:
        return "the model's batcher has stopped; this worker is not serving"
    return None


async def get_predictor(state: Annotated[ModelState, Depends(get_state)]) -> Predictor:
    reason = not_serving(state)
    if reason is not None or state.predictor is None:
        raise ApiError(503, "not-ready", reason or "model is still loading")
    return state.predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
StateDep = Annotated[ModelState, Depends(get_state)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
