"""POST /admin/bundle: serve another bundle without a restart and without failing a request."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Security
from pydantic import BaseModel, Field, field_validator

from service.api.auth import ADMIN_PREFIX, admin_key_header, api_key_header
from service.api.dependencies import MetricsDep, SettingsDep, StateDep
from service.api.errors import ApiError
from service.api.logs import printable
from service.api.schemas import problem_responses
from service.api.settings import Settings
from service.core.bundle import BundleError

log = logging.getLogger("service")


def allowed_bundle(requested: Path | None, settings: Settings) -> Path:
    """The configured bundle, or one under LESION_BUNDLES_ROOT: no other folder of the server is
    loaded. The path is resolved once and that resolved path is what loads (a link changed after
    the check changes nothing)."""
    try:
        configured = settings.bundle.resolve()
        resolved = configured if requested is None else requested.resolve()
        root = settings.bundles_root
        inside = resolved == configured or (root is not None and resolved.is_relative_to(root.resolve()))
    except (OSError, RuntimeError) as exc:  # a name too long, a link loop
        raise ApiError(
            422, "bundle-path-invalid", f"bundle: the path cannot be resolved ({type(exc).__name__})"
        ) from None
    if not inside:
        raise ApiError(
            403,
            "bundle-forbidden",
            "bundle: only the configured bundle, or one under LESION_BUNDLES_ROOT, may be loaded",
        )
    return resolved


router = APIRouter(
    prefix=ADMIN_PREFIX.rstrip("/"),
    tags=["admin"],
    dependencies=[Security(api_key_header), Security(admin_key_header)],  # declared; checked by the guard
    responses=problem_responses(
        {
            401: "unauthorized",
            403: "admin-off, bundle-forbidden",
            422: "bundle-refused (the old bundle still serves), bundle-path-invalid, request-invalid",
        }
    ),
)


class SwapRequest(BaseModel):
    bundle: Path | None = Field(
        None,
        description="bundle folder on the server, under LESION_BUNDLES_ROOT; default: the configured LESION_BUNDLE",
    )

    @field_validator("bundle", mode="before")
    @classmethod
    def _plain_path(cls, v: object) -> object:
        if isinstance(v, str) and (len(v) > 4096 or printable(v) != v):
            raise ValueError("must be a plain path: at most 4096 characters, no control characters")
        return v


class SwapResponse(BaseModel):
    previous: str = Field(description="bundle_id served before")
    serving: str = Field(description="bundle_id served now")


@router.post("/bundle", response_model=SwapResponse)
async def swap_bundle(
    body: SwapRequest,
    state: StateDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> SwapResponse:
    """Load, verify and warm the bundle beside the served one, then switch to it atomically (set
    LESION_PUBLIC_KEY too, so that only signed bundles load). Requests
    already accepted finish on the old bundle; every response names the bundle that answered it
    (`model.bundle_id`). A bundle that does not load is refused (422) and the old one keeps serving.
    With several workers, each worker swaps on its own: send SIGHUP to every worker, or roll the pods."""
    path = allowed_bundle(body.bundle, settings)
    try:
        old, new = await state.swap(settings, path)
    except (BundleError, OSError) as exc:
        log.warning("bundle swap to %s refused: %s", path, exc)
        raise ApiError(422, "bundle-refused", f"bundle {path} refused, still serving the old one: {exc}") from None
    metrics.serving(new, old)
    log.info("now serving %s (was %s)", new, old, extra={"bundle_id": new})
    return SwapResponse(previous=old, serving=new)
