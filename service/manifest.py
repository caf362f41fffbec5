"""The bundle's manifest: one schema, written by training and read by the service."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, Field

from service.features import FeatureSpec
from service.preprocess import ImageSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Libraries whose pickles or graphs the bundle holds: the service refuses a bundle written by
# a different major.minor version of any of them.
CHECKED_LIBRARIES = ["numpy", "scikit-learn", "xgboost", "lightgbm", "catboost", "onnxruntime"]


class MetadataSchema(BaseModel):
    sexes: list[str]
    sites: list[str]
    age_min: float
    age_max: float


class CnnInfo(BaseModel):
    file: str = "cnn.onnx"
    input_name: str = "image"
    output_name: str = "probabilities"
    members: int = Field(description="fold models averaged inside the graph")
    architecture: str = "resnet18"


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    bundle_id: str
    created_at: str
    classes: list[str]
    class_names: dict[str, str]
    malignant_classes: list[str]
    preprocessing: ImageSpec
    metadata_schema: MetadataSchema
    feature_spec: FeatureSpec
    features: list[str] = Field(description="the boosters' column order")
    cnn: CnnInfo
    models: dict[str, str] = Field(description="level-2 model name -> pickle file")
    files: dict[str, str] = Field(description="file name -> sha256")
    library_versions: dict[str, str]
    metrics: dict = Field(default_factory=dict, description="cross-validated metrics from report.json")
    training: dict = Field(default_factory=dict, description="run configuration and data summary")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in CHECKED_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out
