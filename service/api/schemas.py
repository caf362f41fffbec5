"""Response models of the HTTP API (shown in /docs). Model names come from the bundle."""

from __future__ import annotations

from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.api.errors import MAX_DETAIL, input_problem
from service.api.logs import printable
from service.api.settings import Settings
from service.core.answers import Answer, OodVerdict, Triage, lesion_verdict
from service.core.explain import COLOUR_SCALE
from service.core.manifest import CnnModel, Manifest, without_paths
from service.core.metadata import MetadataError
from service.core.ood import IMAGE_CHECK
from service.core.predictor import Explanation, Predictor
from service.core.preprocess import ImageError
from service.core.triage import BASIS

NOTICE = (
    "Research use only. Not a medical device and not a diagnosis: a dermatologist must assess any lesion of concern."
)
SYNTHETIC_NOTICE = (
    "DEMO MODEL: trained on synthetic images the project generates, not on real lesions; its answers mean nothing."
)


def notice_for(manifest: Manifest) -> str:
    return f"{SYNTHETIC_NOTICE} {NOTICE}" if manifest.synthetic_data else NOTICE


class ModelRef(BaseModel):
    bundle_id: str
    created_at: str
    synthetic_data: bool = Field(description="true: a demo bundle trained on synthetic images")

    @classmethod
    def of(cls, manifest: Manifest) -> ModelRef:
        return cls(bundle_id=manifest.bundle_id, created_at=manifest.created_at, synthetic_data=manifest.synthetic_data)


class OodResult(BaseModel):
    method: str = Field(description="mahalanobis (CNN embedding) or energy (CNN logits); higher is less familiar")
    score: float
    threshold: float = Field(description="scores above it are flagged; it flags `flag_share` of real training images")
    flag_share: float
    image_score: float | None = Field(
        None, description="the image-statistics check: how unlike the training images' colour and texture it is"
    )
    image_threshold: float | None = Field(None, description="image scores above it are flagged")
    flagged: bool = Field(description="either score above its threshold")
    flagged_by: list[str] = Field(
        default_factory=list,
        description=f"which checks flag it: the method (its score from the CNN), {IMAGE_CHECK} (colour and texture)",
    )

    @classmethod
    def of(cls, verdict: OodVerdict) -> OodResult:
        spec = verdict.spec
        return cls(
            method=spec.method,
            score=verdict.score,
            threshold=spec.threshold,
            flag_share=spec.flag_share,
            image_score=verdict.image_score,
            image_threshold=spec.image_threshold,
            flagged=verdict.flagged,
            flagged_by=verdict.flagged_by,
        )


class TriageOut(BaseModel):
    """Refer or routine at one of the bundle's operating points (GET /model lists them)."""

    decision: Literal["refer", "routine", "not-triaged"] = Field(
        description="refer: the malignant probability reached the point's threshold; not-triaged: the image has a "
        "warning (quality, out of distribution), so no routine is given"
    )
    point: str = Field(description="the operating point decided at: its target sensitivity for malignancy")
    score: float = Field(description=f"the score compared: {BASIS}")
    threshold: float
    sensitivity: float = Field(
        description="the point's sensitivity for malignancy, as the bundle measured it (GET /model: triage.measured_on)"
    )
    specificity: float = Field(description="its specificity, measured the same way")
    reason: str = Field(description="the decision in words")
    basis: str = Field(BASIS, description="what the decision reads, in words")

    @classmethod
    def of(cls, t: Triage) -> TriageOut:
        return cls(
            decision=t.decision,
            point=t.point.name,
            score=t.score,
            threshold=t.point.threshold,
            sensitivity=t.point.sensitivity.value,
            specificity=t.point.specificity.value,
            reason=t.reason,
            basis=t.basis,
        )


class PredictionFields(BaseModel):
    label: str = Field(description="predicted class (dx code): the served model's most probable")
    label_name: str
    probabilities: dict[str, float] = Field(description="class -> probability, from the served model")
    malignant_probability: float = Field(description="sum of the malignant classes' probabilities")
    served_by: str = Field(description="the component whose probabilities are the answer")
    components: dict[str, dict[str, float]] = Field(description="model -> class probabilities, every model")
    prior: str = Field(
        "balanced",
        description="class prior of these probabilities: balanced (as trained), training (the training data's "
        "class shares) or custom (the request's)",
    )
    ood: OodResult | None = Field(None, description="how unlike the training images this one is (None: no score)")
    warnings: list[str] = Field(default_factory=list, description="image quality and out-of-distribution warnings")
    triage: TriageOut | None = Field(
        None, description="refer or routine at the request's operating point (None: the bundle has no points)"
    )

    @classmethod
    def of(cls, answer: Answer, manifest: Manifest, **extra: Any) -> Self:
        def as_dict(p: np.ndarray) -> dict[str, float]:
            return {c: float(v) for c, v in zip(manifest.classes, p)}

        return cls(
            label=answer.label,
            label_name=manifest.class_names[answer.label],
            probabilities=as_dict(answer.probabilities),
            malignant_probability=answer.malignant_probability,
            served_by=answer.prediction.served,
            components={name: as_dict(answer.prediction.components[name]) for name in manifest.components},
            prior=answer.prior,
            ood=None if answer.ood is None else OodResult.of(answer.ood),
            warnings=answer.warnings,
            triage=None if answer.triage is None else TriageOut.of(answer.triage),
            **extra,
        )


class ExplanationOut(BaseModel):
    label: str = Field(description="the class explained: the served answer")
    heatmap_png: str = Field(description="base64 PNG: the class activation map over the model-size image")
    map_png: str = Field(description="base64 PNG: the map alone in its colour scale, model size, to lay over the image")
    colour_scale: list[str] = Field(description="the map's colours from low to high (hex), for a legend")
    cam: list[list[float]] = Field(description="the raw class activation map (rows of the CNN's last feature map)")
    attributions: dict[str, dict[str, float]] = Field(
        description="booster -> input group (image: the CNN's probabilities; age, sex, site, colour, bias) -> TreeSHAP contribution to its "
        "raw (log-odds) score for the explained class"
    )

    @classmethod
    def of(cls, e: Explanation) -> ExplanationOut:
        return cls(
            label=e.label,
            heatmap_png=e.heatmap_png,
            map_png=e.map_png,
            colour_scale=COLOUR_SCALE,
            cam=e.cam.tolist(),
            attributions=e.attributions,
        )


class PredictResponse(PredictionFields):
    explanation: ExplanationOut | None = Field(None, description="with explain=true: heatmap and attributions")
    model: ModelRef
    request_id: str
    notice: str = Field(description="research-use notice; it says so first when the model is a synthetic-data demo")

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "label": "nv",
                "label_name": "Melanocytic nevus",
                "probabilities": {
                    "akiec": 0.01,
                    "bcc": 0.02,
                    "bkl": 0.05,
                    "df": 0.01,
                    "mel": 0.08,
                    "nv": 0.82,
                    "vasc": 0.01,
                },
                "malignant_probability": 0.11,
                "served_by": "<the served model, see GET /model>",
                "components": {"<each model of GET /model's components>": {"nv": 0.82, "...": 0.18}},
                "model": {
                    "bundle_id": "ham-resnet18-20261126T140221Z-868d4c7e",
                    "created_at": "2026-11-26T14:02:21+00:00",
                    "synthetic_data": False,
                },
                "request_id": "3f2a0c7e9b1d4c55",
                "notice": NOTICE,
            }
        }
    )


class BatchItem(PredictionFields):
    filename: str | None


class ItemError(BaseModel):
    status: int = Field(description="the HTTP status this image alone would have had")
    code: str = Field(
        description="stable: image-invalid, image-unsupported, image-too-large, image-shape, metadata-invalid"
    )
    detail: str = Field(description="what is wrong, for a person")


class BatchItemError(BaseModel):
    """An image of a batch that was not answered; the others were."""

    filename: str | None
    error: ItemError

    @classmethod
    def of(cls, filename: str | None, exc: ImageError | MetadataError) -> BatchItemError:
        status, code = input_problem(exc)
        return cls(filename=filename, error=ItemError(status=status, code=code, detail=printable(str(exc), MAX_DETAIL)))


class LesionAnswer(BaseModel):
    """One answer for a lesion: its answered images' served probabilities combined by the bundle's
    lesion rule, with every image's out-of-distribution flag and warnings kept."""

    lesion_id: str
    images: list[int] = Field(description="positions (0-based, in request order) of the images combined")
    unanswered: list[int] = Field(
        default_factory=list, description="positions of this lesion's images that got an error entry instead"
    )
    combined_by: str = Field(description="the bundle's lesion rule (GET /model): mean or log_mean of probabilities")
    label: str = Field(description="predicted class (dx code) of the lesion")
    label_name: str
    probabilities: dict[str, float] = Field(description="class -> probability, under the request's prior")
    malignant_probability: float
    served_by: str
    prior: str
    ood_flagged: list[int] = Field(description="positions of its images flagged out of distribution")
    warnings: list[str] = Field(description="every image's warnings, each naming its image; and what is missing")
    triage: TriageOut | None = Field(
        None,
        description="refer or routine for the lesion, at the request's point chosen on lesions (its images combined "
        "as trained); not-triaged when any of its images has a warning (None: the bundle has no lesion points)",
    )

    @classmethod
    def of(
        cls,
        lesion_id: str,
        answers: dict[int, Answer],
        names: list[str | None],
        unanswered: list[int],
        m: Manifest,
        point: str | None = None,
    ) -> Self:
        """`answers`: position -> answer of this lesion's answered images; `names`: every upload's file name."""
        positions = sorted(answers)
        verdict = lesion_verdict(m, [answers[i] for i in positions], point)
        warnings = [f"image {i} ({names[i] or 'unnamed'}): {w}" for i in positions for w in answers[i].warnings]
        if unanswered:
            warnings.append(
                f"answered from {len(positions)} of its {len(positions) + len(unanswered)} images: images "
                f"{', '.join(map(str, unanswered))} could not be read (see their entries)"
            )
        first = answers[positions[0]]
        return cls(
            lesion_id=lesion_id,
            images=positions,
            unanswered=unanswered,
            combined_by=m.lesion_rule,
            label=verdict.label,
            label_name=m.class_names[verdict.label],
            probabilities={c: float(v) for c, v in zip(m.classes, verdict.probabilities)},
            malignant_probability=verdict.malignant_probability,
            served_by=first.prediction.served,
            prior=first.prior,
            ood_flagged=[i for i in positions if answers[i].ood_flagged],
            warnings=warnings,
            triage=None if verdict.triage is None else TriageOut.of(verdict.triage),
        )


class LesionUnanswered(BaseModel):
    """A lesion none of whose images could be answered."""

    lesion_id: str
    unanswered: list[int] = Field(description="positions of its images, each with an error entry")
    error: ItemError


def lesion_answers(
    ids: list[str | None],
    answers: dict[int, Answer],
    names: list[str | None],
    manifest: Manifest,
    point: str | None = None,
) -> list[LesionAnswer | LesionUnanswered]:
    """One entry per distinct lesion id, in order of first appearance (`answers`: upload position ->
    its answer, for the uploads that got one)."""
    groups: dict[str, list[int]] = {}
    for i, lesion in enumerate(ids):
        if lesion is not None:
            groups.setdefault(lesion, []).append(i)
    out: list[LesionAnswer | LesionUnanswered] = []
    for lesion, positions in groups.items():
        answered = {i: answers[i] for i in positions if i in answers}
        missing = [i for i in positions if i not in answers]
        if answered:
            out.append(LesionAnswer.of(lesion, answered, names, missing, manifest, point))
        else:
            detail = "none of this lesion's images could be answered (see their entries)"
            out.append(
                LesionUnanswered(
                    lesion_id=lesion,
                    unanswered=missing,
                    error=ItemError(status=422, code="lesion-unanswered", detail=detail),
                )
            )
    return out


class BatchResponse(BaseModel):
    predictions: list[BatchItem | BatchItemError] = Field(
        description="one per image, in request order: an answer, or (with `error`) why that image got none"
    )
    lesions: list[LesionAnswer | LesionUnanswered] | None = Field(
        None, description="with lesion_ids: one answer per lesion, from all of its answered images"
    )
    model: ModelRef
    request_id: str
    notice: str = Field(description="research-use notice; it says so first when the model is a synthetic-data demo")


class ErrorResponse(BaseModel):
    """An RFC 9457 problem (served as application/problem+json)."""

    type: str = Field(description="urn:lesion-classifier:problem:<code>")
    title: str
    status: int
    code: str = Field(description="stable: what a program branches on (listed per status on each route)")
    detail: str = Field(description="what is wrong, for a person")
    request_id: str | None = None


def problem_responses(codes: dict[int, str]) -> dict[int | str, dict]:
    """OpenAPI `responses` for a route: each status with its problem codes."""
    return {
        status: {"model": ErrorResponse, "description": f"problem codes: {names}"} for status, names in codes.items()
    }


def cnn_info(predictor: Predictor, cnn: CnnModel) -> dict:
    """One CNN as GET /model shows it."""
    return {
        "name": cnn.name,
        "architecture": cnn.architecture,
        "weights": cnn.weights,
        "weights_source": cnn.weights_source,
        "weights_sha256": cnn.weights_sha256,
        "file": predictor.cnn_files[cnn.name],
        "precision": predictor.cnn_precision(cnn),
        "members": cnn.members,
        "tta": cnn.tta,
        "quantization": cnn.quantization.model_dump() if cnn.quantization else None,
    }


class ModelInfo(BaseModel):
    bundle_id: str
    created_at: str
    synthetic_data: bool = Field(description="true: a demo bundle trained on synthetic images, not a model of lesions")
    notice: str
    classes: list[str]
    class_names: dict[str, str]
    malignant_classes: list[str]
    metadata_schema: dict = Field(description="what the metadata field may hold: age range, sexes, sites")
    preprocessing: dict
    components: list[str] = Field(description="every model a prediction reports, in order")
    served_by: str
    served_choice: dict | None = Field(
        description="how the served combiner was chosen, out-of-fold (None: older bundles)"
    )
    lesion_rule: str = Field(description="how /predict/batch combines a lesion's images (lesion_ids): mean or log_mean")
    lesion_rule_choice: dict | None = Field(description="how the lesion rule was chosen, out-of-fold")
    cnn: dict = Field(description="the lead CNN (heatmaps, OOD score): as each of `cnns`")
    cnns: list[dict] = Field(
        description="every CNN graph this worker runs: name, architecture, initial weights (source, sha256), file, "
        "precision, fold models, TTA, the int8 gate"
    )
    metrics: dict[str, dict[str, float | None]] = Field(description="cross-validated (out-of-fold) metrics per model")
    metric_intervals: dict[str, dict[str, list[float | None]]] = Field(
        description="their 95% lesion-bootstrap intervals, [low, high]"
    )
    training: dict
    limits: dict = Field(description="what one request may hold: images per /predict/batch, bytes per image, pixels")
    explain: bool = Field(description="whether /predict can add a heatmap and attributions (explain=true)")
    ood: dict | None = Field(description="the out-of-distribution score: method, thresholds, share flagged by design")
    priors: dict = Field(description="the default class prior, the training data's class shares and the temperature")
    triage: dict | None = Field(
        description="the triage operating points (threshold, sensitivity, specificity, referral share, "
        "PPV, NPV with intervals) and the default (None: bundles before them)"
    )
    model_card: str | None = Field(description="path of the bundle's model card (markdown), if it has one")

    @classmethod
    def of(cls, predictor: Predictor, settings: Settings) -> ModelInfo:
        m = predictor.manifest
        return cls(
            bundle_id=m.bundle_id,
            created_at=m.created_at,
            synthetic_data=m.synthetic_data,
            notice=notice_for(m),
            classes=m.classes,
            class_names=m.class_names,
            malignant_classes=m.malignant_classes,
            metadata_schema=m.features.metadata_schema(),
            preprocessing=m.preprocessing.model_dump(),
            components=m.components,
            served_by=m.served,
            served_choice=m.served_choice.model_dump() if m.served_choice else None,
            lesion_rule=m.lesion_rule,
            lesion_rule_choice=m.lesion_rule_choice.model_dump() if m.lesion_rule_choice else None,
            cnn=cnn_info(predictor, m.cnn),
            cnns=[cnn_info(predictor, c) for c in m.cnns],
            metrics=m.metrics,
            metric_intervals=m.metric_intervals,
            training=without_paths(m.training),
            limits={
                "max_batch": settings.max_batch,
                "max_upload_bytes": settings.max_upload_bytes,
                "max_batch_bytes": settings.max_batch_bytes,
                "max_pixels": settings.max_pixels,
                "max_request_pixels": settings.max_request_pixels,
            },
            explain=m.cnn.can_explain,
            ood=m.ood.model_dump() if m.ood else None,
            priors={
                "default": m.default_prior,
                "training_prevalence": m.training_prevalence,
                "temperature": m.temperature,
            },
            model_card="/model/card" if m.model_card else None,
            triage=m.triage.model_dump() if m.triage else None,
        )
