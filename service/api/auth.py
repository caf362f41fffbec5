"""The one access policy, applied once, by the request guard before any body is read.

Public: the page, the docs and the health probes (the protocol's too). Every other route needs the
API key when one is set (LESION_API_KEY), in X-API-Key or as a bearer token (`Authorization: Bearer
<key>`, what Prometheus scrape configs and the Triton client's headers can send). Admin routes are off unless an admin key is set (LESION_ADMIN_KEY), and then
need it as well: a prediction client's key is not enough. Routes only declare the headers (for
the Authorize button of /docs); they do not check them again.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from fastapi.security import APIKeyHeader

from service.api.settings import Settings

API_KEY_HEADER = "X-API-Key"
ADMIN_KEY_HEADER = "X-Admin-Key"
ADMIN_PREFIX = "/admin/"
PUBLIC_PATHS = {
    "/",
    "/docs",
    "/openapi.json",
    "/health/live",
    "/health/ready",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
}
PUBLIC_PREFIXES = ("/docs-assets/",)

api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when the service has a key")
admin_key_header = APIKeyHeader(
    name=ADMIN_KEY_HEADER, scheme_name="AdminKey", auto_error=False, description="the admin key (LESION_ADMIN_KEY)"
)


def matches(sent: str | None, key: str) -> bool:
    """Constant-time comparison."""
    return sent is not None and hmac.compare_digest(sent.encode(), key.encode())


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the app routes on: uvicorn (with --root-path) puts the root path in front of it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def sent_key(headers: Mapping[str, str]) -> str | None:
    """The API key a request carries: X-API-Key, else an `Authorization: Bearer` token."""
    key = headers.get(API_KEY_HEADER.lower())
    if key is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return key


def access_refusal(path: str, headers: Mapping[str, str], settings: Settings) -> tuple[int, str, str] | None:
    """(status, code, detail) when the request may not reach `path` (a route path), else None."""
    public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
    if not public and settings.api_key and not matches(sent_key(headers), settings.api_key):
        return 401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header (or Authorization: Bearer token)"
    if path.startswith(ADMIN_PREFIX):
        if not settings.admin_key:
            return 403, "admin-off", "admin routes are off: set LESION_ADMIN_KEY to enable them"
        if not matches(headers.get(ADMIN_KEY_HEADER.lower()), settings.admin_key):
            return 401, "unauthorized", f"missing or wrong {ADMIN_KEY_HEADER} header"
    return None
