"""Python client for the skin-lesion classifier's HTTP API: `pip install ./clients` from the repository."""

from lesion_client.client import AsyncLesionClient, LesionClient
from lesion_client.errors import LesionAPIError, LesionConnectionError, LesionError, LesionTimeout
from lesion_client.results import (
    Explanation,
    Failed,
    LesionFailed,
    LesionPrediction,
    LesionResults,
    ModelRef,
    Ood,
    Prediction,
    Triage,
)

__all__ = [
    "AsyncLesionClient",
    "Explanation",
    "Failed",
    "LesionClient",
    "LesionAPIError",
    "LesionConnectionError",
    "LesionError",
    "LesionFailed",
    "LesionPrediction",
    "LesionResults",
    "LesionTimeout",
    "ModelRef",
    "Ood",
    "Prediction",
    "Triage",
]
