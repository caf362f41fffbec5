"""Typed results of the API's JSON answers (unknown fields from newer servers are ignored)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelRef:
    """Which bundle answered."""

    bundle_id: str
    created_at: str
    synthetic_data: bool = False

    @classmethod
    def from_json(cls, d: dict) -> ModelRef:
        return cls(d["bundle_id"], d["created_at"], bool(d.get("synthetic_data", False)))


@dataclass(frozen=True)
class Ood:
    """How unlike the training images this one is: flagged when the CNN's score or the image
    statistics' is above its threshold (the answer may be meaningless); `flagged_by` says which."""

    method: str
    score: float
    threshold: float
    flag_share: float
    flagged: bool
    image_score: float | None = None  # None: a server or bundle without the image-statistics check
    image_threshold: float | None = None
    flagged_by: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, d: dict | None) -> Ood | None:
        if d is None:
            return None
        number = lambda v: None if v is None else float(v)  # noqa: E731
        return cls(
            d["method"],
            float(d["score"]),
            float(d["threshold"]),
            float(d["flag_share"]),
            bool(d["flagged"]),
            number(d.get("image_score")),
            number(d.get("image_threshold")),
            tuple(d.get("flagged_by", ())),
        )


@dataclass(frozen=True)
class Triage:
    """Refer or routine at one of the bundle's operating points: `decision` is refer, routine or
    not-triaged (the image has a warning); `sensitivity` and `specificity` are what the point
    promises, as the bundle measured them (its `triage.measured_on`); `score` (the malignant probability as trained) was compared
    with `threshold`; `reason` says it in words."""

    decision: str
    point: str
    score: float
    threshold: float
    sensitivity: float
    specificity: float
    reason: str
    basis: str = ""  # what the decision reads: the malignant probability as trained, whatever the prior shown

    @property
    def refer(self) -> bool:
        return self.decision == "refer"

    @classmethod
    def from_json(cls, d: dict | None) -> Triage | None:
        if d is None:
            return None
        return cls(
            str(d["decision"]),
            str(d["point"]),
            float(d["score"]),
            float(d["threshold"]),
            float(d["sensitivity"]),
            float(d["specificity"]),
            str(d["reason"]),
            str(d.get("basis", "")),
        )


@dataclass(frozen=True)
class Explanation:
    """Why the answer: the heatmap (a PNG's bytes) and each booster's attributions per input group."""

    label: str
    heatmap_png: bytes
    cam: list[list[float]]
    attributions: dict[str, dict[str, float]]

    @classmethod
    def from_json(cls, d: dict | None) -> Explanation | None:
        if d is None:
            return None
        return cls(d["label"], base64.b64decode(d["heatmap_png"]), d["cam"], d["attributions"])


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the served model's probabilities and every model's, with the bundle that
    answered and the research-use notice (which starts with DEMO MODEL for a synthetic-data bundle),
    and what says to distrust it: the out-of-distribution score and flag, and the warnings."""

    label: str
    label_name: str
    probabilities: dict[str, float]
    malignant_probability: float
    served_by: str
    components: dict[str, dict[str, float]]
    model: ModelRef
    request_id: str
    notice: str
    filename: str | None = None
    prior: str = "balanced"
    ood: Ood | None = None
    warnings: list[str] = field(default_factory=list)
    explanation: Explanation | None = None
    triage: Triage | None = None  # None: a server or bundle without triage operating points

    @property
    def flagged(self) -> bool:
        """Out of distribution, or warned about: read the answer with care, or not at all."""
        return bool(self.warnings) or (self.ood is not None and self.ood.flagged)

    @classmethod
    def from_json(cls, item: dict, envelope: dict) -> Prediction:
        """`item` holds the per-image fields; `envelope` the response's model, request_id and notice."""
        return cls(
            label=item["label"],
            label_name=item["label_name"],
            probabilities=item["probabilities"],
            malignant_probability=item["malignant_probability"],
            served_by=item["served_by"],
            components=item["components"],
            model=ModelRef.from_json(envelope["model"]),
            request_id=envelope["request_id"],
            notice=envelope["notice"],
            filename=item.get("filename"),
            prior=item.get("prior", "balanced"),
            ood=Ood.from_json(item.get("ood")),
            warnings=list(item.get("warnings", [])),
            explanation=Explanation.from_json(item.get("explanation")),
            triage=Triage.from_json(item.get("triage")),
        )


@dataclass(frozen=True)
class Failed:
    """An image of a batch that got no answer (the others did): why, as the server said."""

    filename: str | None
    status: int
    code: str  # image-invalid, image-unsupported, image-too-large, image-shape, metadata-invalid
    detail: str
    request_id: str

    @classmethod
    def from_json(cls, item: dict, envelope: dict) -> Failed:
        e = item["error"]
        return cls(item.get("filename"), int(e["status"]), str(e["code"]), str(e["detail"]), envelope["request_id"])


def batch_item(item: dict, envelope: dict) -> Prediction | Failed:
    """One entry of a /predict/batch answer: an answer, or why that image got none."""
    return Failed.from_json(item, envelope) if "error" in item else Prediction.from_json(item, envelope)


@dataclass(frozen=True)
class LesionPrediction:
    """One answer for a lesion from all of its answered images (`combined_by`: the bundle's rule);
    `images`, `unanswered` and `ood_flagged` are positions in the list the caller sent."""

    lesion_id: str
    label: str
    label_name: str
    probabilities: dict[str, float]
    malignant_probability: float
    served_by: str
    prior: str
    combined_by: str
    images: tuple[int, ...]
    unanswered: tuple[int, ...] = ()
    ood_flagged: tuple[int, ...] = ()
    warnings: list[str] = field(default_factory=list)
    triage: Triage | None = None  # at the point chosen on lesions; None: no lesion operating points

    @property
    def flagged(self) -> bool:
        """An image out of distribution or warned about, or an image missing: read with care."""
        return bool(self.warnings or self.ood_flagged or self.unanswered)


@dataclass(frozen=True)
class LesionFailed:
    """A lesion none of whose images could be answered."""

    lesion_id: str
    unanswered: tuple[int, ...]
    code: str
    detail: str


def lesion_item(item: dict, envelope: dict, rows: Sequence[int]) -> LesionPrediction | LesionFailed:
    """One entry of a response's `lesions`; `rows[j]` is the caller's position of the request's image j."""
    at = lambda positions: tuple(rows[j] for j in positions)  # noqa: E731
    if "error" in item:
        return LesionFailed(item["lesion_id"], at(item["unanswered"]), item["error"]["code"], item["error"]["detail"])
    return LesionPrediction(
        lesion_id=item["lesion_id"],
        label=item["label"],
        label_name=item["label_name"],
        probabilities=item["probabilities"],
        malignant_probability=item["malignant_probability"],
        served_by=item["served_by"],
        prior=item["prior"],
        combined_by=item["combined_by"],
        images=at(item["images"]),
        unanswered=at(item.get("unanswered", [])),
        ood_flagged=at(item.get("ood_flagged", [])),
        warnings=list(item.get("warnings", [])),
        triage=Triage.from_json(item.get("triage")),
    )


@dataclass
class LesionResults:
    """`images`: each image's answer (or `Failed`), in the order sent; `lesions`: lesion id -> its answer."""

    images: list[Prediction | Failed | None]  # None only while a request is outstanding
    lesions: dict[str, LesionPrediction | LesionFailed]

    def add(self, body: dict, rows: Sequence[int]) -> None:
        for j, item in zip(rows, body["predictions"]):
            self.images[j] = batch_item(item, body)
        self.lesions.update(
            {entry.lesion_id: entry for entry in (lesion_item(i, body, rows) for i in body.get("lesions") or [])}
        )
