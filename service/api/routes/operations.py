"""What operators and people look at: health, model info, Prometheus metrics, the docs and the page."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import swagger_ui
from fastapi import APIRouter, FastAPI, Query, Request, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from markdown_it import MarkdownIt
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.auth import api_key_header
from service.api.dependencies import MetricsDep, PredictorDep, SettingsDep
from service.api.errors import ApiError
from service.api.schemas import ModelInfo, problem_responses

STATIC = Path(__file__).parents[1] / "static"
SWAGGER_UI = Path(swagger_ui.__file__).parent / "static"  # swagger-ui-py ships Swagger UI 5
DOCS_ASSETS = "/docs-assets"
KEYED = problem_responses({401: "unauthorized"})

router = APIRouter()


def docs_page(app: FastAPI) -> str:
    return bytes(
        get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        ).body
    ).decode()


@cache
def page_html() -> str:
    return (STATIC / "index.html").read_text()


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.docs_html)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(page_html())


@router.get("/health/live", tags=["health"])
async def live() -> dict:
    return {"status": "alive"}


@router.get("/health/ready", tags=["health"], responses=problem_responses({503: "not-ready"}))
async def ready(predictor: PredictorDep) -> dict:
    return {"status": "ready", "bundle_id": predictor.manifest.bundle_id}


@router.get(
    "/model", response_model=ModelInfo, tags=["model"], dependencies=[Security(api_key_header)], responses=KEYED
)
async def model_info(predictor: PredictorDep, settings: SettingsDep) -> ModelInfo:
    return ModelInfo.of(predictor, settings)


# CommonMark and tables; raw HTML in the markdown is escaped and links are limited to safe schemes
# (no javascript:), so the page can insert the result as it is.
CARD_RENDERER = MarkdownIt("js-default")


@router.get(
    "/model/card",
    response_class=Response,
    tags=["model"],
    dependencies=[Security(api_key_header)],
    responses={
        **KEYED,
        **problem_responses({404: "model-card-missing"}),
        200: {"content": {"text/markdown": {}, "text/html": {}}},
    },
)
async def model_card(
    predictor: PredictorDep,
    format: Literal["markdown", "html"] = Query("markdown", description="html: rendered in safe mode"),
) -> Response:
    """The bundle's model card: intended use, data, metrics with intervals, subgroups, limits."""
    if predictor.model_card is None:
        raise ApiError(404, "model-card-missing", "this bundle has no model card (bundles before format 4 have none)")
    if format == "html":
        return Response(CARD_RENDERER.render(predictor.model_card), media_type="text/html; charset=utf-8")
    return Response(predictor.model_card, media_type="text/markdown; charset=utf-8")


@router.get(
    "/metrics", tags=["health"], response_class=Response, dependencies=[Security(api_key_header)], responses=KEYED
)
async def prometheus(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
