"""Request and response models of the HTTP API (shown in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

NOTICE = (
    "Research use only. Not a medical device and not a diagnosis: a dermatologist must assess any lesion of concern."
)


class MetadataIn(BaseModel):
    """The `metadata` form field: JSON, every key optional (missing means unknown)."""

    model_config = ConfigDict(extra="forbid")
    age: float | None = Field(None, description="years, 0-120", examples=[55])
    sex: str | None = Field(None, examples=["male"])
    site: str | None = Field(None, description="anatomical site", examples=["back"])


class ModelRef(BaseModel):
    bundle_id: str
    created_at: str


class PredictResponse(BaseModel):
    label: str = Field(description="predicted class (dx code), argmax of the stack")
    label_name: str
    probabilities: dict[str, float] = Field(description="class -> probability, from the stacked meta-learner")
    malignant_probability: float = Field(description="sum of the malignant classes' probabilities (mel, bcc, akiec)")
    components: dict[str, dict[str, float]] = Field(description="model -> class probabilities")
    model: ModelRef
    request_id: str
    notice: str = NOTICE

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
                "components": {"cnn": {"nv": 0.7, "...": 0.3}, "stack": {"nv": 0.82, "...": 0.18}},
                "model": {
                    "bundle_id": "ham-resnet18-20261126T140221Z-868d4c7e",
                    "created_at": "2026-11-26T14:02:21+00:00",
                },
                "request_id": "3f2a0c7e9b1d4c55",
                "notice": NOTICE,
            }
        }
    )


class BatchItem(BaseModel):
    filename: str | None
    label: str
    label_name: str
    probabilities: dict[str, float]
    malignant_probability: float
    components: dict[str, dict[str, float]]


class BatchResponse(BaseModel):
    predictions: list[BatchItem] = Field(description="one per image, in request order")
    model: ModelRef
    request_id: str
    notice: str = NOTICE


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, for a person")
    request_id: str | None = None


class ModelInfo(BaseModel):
    bundle_id: str
    created_at: str
    classes: list[str]
    class_names: dict[str, str]
    malignant_classes: list[str]
    metadata_schema: dict
    preprocessing: dict
    components: list[str]
    metrics: dict = Field(description="cross-validated (out-of-fold) metrics per model")
    training: dict
