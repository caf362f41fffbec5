"""POST /admin/bundle: serve another bundle without a restart and without failing a request."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field

from service.api.dependencies import check_api_key, get_metrics, get_settings, get_state
from service.api.metrics import Metrics
from service.api.schemas import ErrorResponse
from service.api.settings import Settings
from service.api.state import ModelState
from service.core.bundle import BundleError

log = logging.getLogger("service")


def admin_enabled(settings: Settings = Depends(get_settings)) -> None:
    if not settings.api_key:
        raise HTTPException(403, "admin routes are off: the service needs an API key (LESION_API_KEY) to enable them")


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(admin_enabled), Depends(check_api_key)],
    responses={c: {"model": ErrorResponse} for c in (401, 403, 422)},
)


class SwapRequest(BaseModel):
    bundle: Path | None = Field(None, description="bundle folder on the server; default: the configured LESION_BUNDLE")


class SwapResponse(BaseModel):
    previous: str = Field(description="bundle_id served before")
    serving: str = Field(description="bundle_id served now")


@router.post("/bundle", response_model=SwapResponse)
async def swap_bundle(
    body: SwapRequest,
    state: ModelState = Depends(get_state),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
) -> SwapResponse:
    """Load, verify and warm the bundle beside the served one, then switch to it atomically. Requests
    already accepted finish on the old bundle; every response names the bundle that answered it
    (`model.bundle_id`). A bundle that does not load is refused (422) and the old one keeps serving.
    With several workers, each worker swaps on its own: send SIGHUP to every worker, or roll the pods."""
    path = body.bundle or settings.bundle
    try:
        old, new = await state.swap(settings, path)
    except (BundleError, OSError) as exc:
        log.warning("bundle swap to %s refused: %s", path, exc)
        raise HTTPException(422, f"bundle {path} refused, still serving the old one: {exc}") from None
    metrics.serving(new, old)
    log.info("now serving %s (was %s)", new, old, extra={"bundle_id": new})
    return SwapResponse(previous=old, serving=new)
