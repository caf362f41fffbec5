"""Triage operating points: refer a lesion when its malignant probability reaches a threshold chosen
for a promised sensitivity.

Training chooses each point's threshold on the bundle's own answers for calibration lesions its
served models never trained on (training/stages/triage.py; bundles made with --calibration-share 0:
the fold models' out-of-fold scores). The threshold that scores fold k's images comes from the other
folds' images (training/evaluation/triage.py), so the sensitivity, specificity and referral share a
point promises were measured on images its threshold never saw; the served threshold is then fitted
on all of them. The decision reads the bundle's own malignant probability as trained (the balanced
prior), whatever prior a request shows its answer under: the threshold was chosen on that score.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

Decision = Literal["refer", "routine", "not-triaged"]
BASIS = (
    "the served model's malignant probability as trained (balanced prior), whatever prior the answer is shown "
    "under: the thresholds were chosen on that score"
)


def point_name(target: float) -> str:
    """A point's name from its target sensitivity: 0.95 -> "sensitivity-0.95"."""
    return f"sensitivity-{target:g}"


class Figure(BaseModel):
    """A measured figure and its 95% lesion-bootstrap interval; null where the images measured give
    none (the NPV of a point that referred every image). JSON has no NaN: a NaN is stored as null."""

    value: float | None
    ci95: list[float | None] = Field(min_length=2, max_length=2)

    @field_validator("value", mode="before")
    @classmethod
    def _nan_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    @field_validator("ci95", mode="before")
    @classmethod
    def _nans_are_none(cls, v: Any) -> Any:
        return [None if isinstance(x, float) and math.isnan(x) else x for x in v] if isinstance(v, list) else v


class OperatingPoint(BaseModel):
    name: str = Field(description='"sensitivity-<target>": what a request names')
    target_sensitivity: float = Field(gt=0, lt=1)
    threshold: float = Field(
        ge=0, le=1, description="refer when the malignant probability (as trained) is at or above it"
    )
    sensitivity: Figure = Field(description="malignant images referred, each by a threshold chosen without its fold")
    specificity: Figure = Field(description="benign images not referred, measured the same way")
    referral_share: Figure = Field(description="images referred, at the training data's prevalence")
    ppv: Figure = Field(description="referred images that are malignant, at the training data's prevalence")
    npv: Figure = Field(description="routine images that are benign, at the training data's prevalence")

    @model_validator(mode="after")
    def _finite(self) -> OperatingPoint:
        if not math.isfinite(self.threshold) or self.name != point_name(self.target_sensitivity):
            raise ValueError(f"operating point {self.name!r}: a finite threshold, named for its target")
        if self.sensitivity.value is None or self.specificity.value is None:
            raise ValueError(f"operating point {self.name!r}: a point promises a measured sensitivity and specificity")
        return self


class TriageSpec(BaseModel):
    """The bundle's operating points, chosen on the served answer for images no model that scored them
    trained on (`measured_on`): per image, and per
    lesion for lesion answers (each lesion's images combined by the bundle's lesion rule, one row each)."""

    points: list[OperatingPoint] = Field(min_length=1)
    lesion_points: list[OperatingPoint] = Field(
        default_factory=list, description="the same targets chosen on lesions (empty: lesion answers are not triaged)"
    )
    default: str = Field(description="the point an answer uses unless the request names another")
    basis: str = BASIS
    images: int = Field(ge=1, description="images the figures were measured on (none trained the models scoring it)")
    lesions: int = Field(ge=1)
    source: Literal["calibration", "out-of-fold"] = Field(
        "out-of-fold",
        description="calibration: the bundle's own answers for lesions held out of its served models' training; "
        "out-of-fold: the fold models' (bundles made with --calibration-share 0, and before it)",
    )
    measured_on: str = Field(
        "out-of-fold through the fold models' graphs",
        description="which images and models the points were chosen on (bundles before the calibration share: the "
        "fold models', which a refit CNN can score differently)",
    )

    @model_validator(mode="after")
    def _default_is_a_point(self) -> TriageSpec:
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"triage points repeat: {names}")
        if self.default not in names:
            raise ValueError(f"triage default {self.default!r} is not one of the points {names}")
        if self.lesion_points and [p.name for p in self.lesion_points] != names:
            raise ValueError("triage lesion_points must have the image points' targets, in order")
        return self

    def point(self, name: str | None, lesion: bool = False) -> OperatingPoint:
        """The named point (None: the default), per image or per lesion; KeyError for a name the
        bundle does not have (or, per lesion, when it has no lesion points)."""
        wanted = self.default if name is None else name
        for p in self.lesion_points if lesion else self.points:
            if p.name == wanted:
                return p
        raise KeyError(wanted)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]
