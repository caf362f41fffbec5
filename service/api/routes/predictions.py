"""POST /predict and POST /predict/batch: uploads + metadata -> the bundle's answer."""

from __future__ import annotations

from fastapi import APIRouter, File, Form, Query, Request, Security, UploadFile
from fastapi.concurrency import run_in_threadpool

from service.api.answering import answer_uploads, parse_prior, parse_triage_point
from service.api.auth import api_key_header
from service.api.dependencies import MetricsDep, PredictorDep, SettingsDep, StateDep
from service.api.errors import ApiError
from service.api.logs import printable
from service.api.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    ExplanationOut,
    ModelRef,
    PredictResponse,
    lesion_answers,
    notice_for,
    problem_responses,
)
from service.api.settings import BATCH_ROUTE
from service.core.features import FeatureSpec
from service.core.lesions import lesion_ids_from_json
from service.core.metadata import (
    EXAMPLE,
    ClinicalMetadata,
    MetadataError,
    metadata_from_json,
    metadata_json_schema,
    metadata_objects_from_json,
    validate_metadata,
)
from service.core.preprocess import ImageError

ERRORS = problem_responses(
    {
        400: "image-invalid, request-invalid (a form that cannot be parsed, too many files)",
        401: "unauthorized",
        408: "body-timeout",
        413: "image-too-large, field-too-large, body-too-large",
        415: "image-unsupported",
        422: "metadata-invalid, prior-invalid, triage-point-invalid, lesion-ids-invalid, image-shape, "
        "explain-unavailable, request-invalid",
        503: "busy (past the worker's in-flight bounds; Retry-After), not-ready",
    }
)

router = APIRouter(tags=["predict"], responses=ERRORS, dependencies=[Security(api_key_header)])


async def read_upload(upload: UploadFile) -> bytes:
    """The file's bytes (the multipart parser has refused one over the size limit, service/api/forms.py);
    the parser's buffer is freed at once (one copy of each upload, not two)."""
    data = await upload.read()
    await upload.close()
    return data


PRIOR_HELP = (
    "class prior of the returned probabilities: balanced (as trained), training (the training data's class "
    'shares), or a JSON object of prevalences such as {"akiec": 0.03, ...} for every class; default: the bundle\'s'
)


TRIAGE_HELP = (
    "the triage operating point to decide at, by name (GET /model lists the bundle's, such as sensitivity-0.95); "
    "default: the bundle's"
)

METADATA_DOC = {  # the metadata field is JSON text: its schema (no contentMediaType: Swagger UI shows that as a file)
    "contentSchema": metadata_json_schema(FeatureSpec()),
    "example": EXAMPLE,
}


@router.post("/predict", response_model=PredictResponse)
async def predict(
    request: Request,
    predictor: PredictorDep,
    state: StateDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    image: UploadFile = File(..., description="JPEG or PNG dermoscopy image"),
    metadata: str | None = Form(
        None,
        description=f"JSON object: {EXAMPLE}; each key optional (the served bundle's values: GET /model)",
        json_schema_extra=METADATA_DOC,
    ),
    prior: str = Form("", description=PRIOR_HELP),
    triage_point: str = Form("", description=TRIAGE_HELP),
    explain: bool = Form(False, description="add a heatmap and metadata attributions (costs a second model pass)"),
    explain_query: bool = Query(False, alias="explain", description="the same as the form field"),
) -> PredictResponse:
    data = await read_upload(image)
    m = predictor.manifest
    meta = metadata_from_json(metadata, m.features)
    chosen = parse_prior(prior, predictor)
    point = parse_triage_point(triage_point, predictor)
    explain = explain or explain_query
    if explain and not m.cnn.can_explain:
        raise ApiError(
            422,
            "explain-unavailable",
            "explain: this bundle's CNN graph has no heatmap output (retrain or re-export it)",
        )
    got = await answer_uploads([(data, image.filename)], [meta], chosen, point, predictor, state, settings, metrics)
    answer = got.answers[0]
    explanation = None
    if explain:  # the answer as returned (under its prior) is the class explained
        (e,) = await run_in_threadpool(predictor.explain, got.images, [meta], [answer.label])
        explanation = ExplanationOut.of(e)
    return PredictResponse.of(
        answer,
        m,
        explanation=explanation,
        model=ModelRef.of(m),
        request_id=request.state.request_id,
        notice=notice_for(m),
    )


@router.post(BATCH_ROUTE, response_model=BatchResponse)
async def predict_batch(
    request: Request,
    predictor: PredictorDep,
    state: StateDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    images: list[UploadFile] = File(
        ...,
        description="several JPEG or PNG images; one that cannot be read gets its own error entry, the others an answer",
    ),
    metadata: str | None = Form(
        None,
        description="JSON list, one metadata object (as for /predict) per image, in order",
        json_schema_extra={
            "contentSchema": {"type": "array", "items": METADATA_DOC["contentSchema"]},
            "example": f"[{EXAMPLE}]",
        },
    ),
    prior: str = Form("", description=PRIOR_HELP),
    triage_point: str = Form("", description=TRIAGE_HELP),
    lesion_ids: str | None = Form(
        None,
        description="JSON list, one lesion id (a string, or null) per image, in order: the images of one lesion "
        "also get one combined answer in `lesions` (the bundle's lesion rule, GET /model)",
        json_schema_extra={"example": '["lesion-1", "lesion-1", null]'},
    ),
) -> BatchResponse:
    ids = lesion_ids_from_json(lesion_ids, len(images))
    uploads = [(await read_upload(f), printable(f.filename or "", 300) or None) for f in images]
    m = predictor.manifest
    metas = metadata_objects_from_json(metadata, len(images))
    chosen = parse_prior(prior, predictor)
    point = parse_triage_point(triage_point, predictor)
    refused: dict[int, ImageError | MetadataError] = {}
    valid: list[ClinicalMetadata] = []
    for i, value in enumerate(metas):
        try:
            valid.append(validate_metadata(value, m.features))
        except MetadataError as exc:
            refused[i] = exc
            valid.append(ClinicalMetadata())
    usable = [i for i in range(len(uploads)) if i not in refused]
    got = await answer_uploads(
        [uploads[i] for i in usable],
        [valid[i] for i in usable],
        chosen,
        point,
        predictor,
        state,
        settings,
        metrics,
        each=True,
    )
    refused.update({usable[j]: exc for j, exc in got.refused.items()})
    answers = {usable[j]: a for j, a in got.answers.items()}
    names = [name for _, name in uploads]
    items: list[BatchItem | BatchItemError] = [
        BatchItemError.of(name, refused[i]) if i in refused else BatchItem.of(answers[i], m, filename=name)
        for i, name in enumerate(names)
    ]
    return BatchResponse(
        predictions=items,
        lesions=None if ids is None else lesion_answers(ids, answers, names, m, point),
        model=ModelRef.of(m),
        request_id=request.state.request_id,
        notice=notice_for(m),
    )
