"""Clinical metadata as people send it -> validated `ClinicalMetadata`, or a `MetadataError` for people.

The coercion policy, the same for the API, the client and offline `Predictor` users:
- every key is optional; a missing key, `null` or `""` means unknown;
- `age`: years as a JSON number or a numeric string ("55"); booleans, NaN and infinity are refused;
  it must lie inside the bundle's age range;
- `sex`, `site`: strings, case-insensitive, surrounding spaces ignored, `_` read as a space, and
  one of the bundle's values; `localization` (HAM10000's column name) is accepted for `site`;
- any other key is refused, naming the allowed ones.

The accepted values are a `MetadataVocabulary`, defined here once with its schemas: a bundle's
feature encoder (`features.FeatureSpec`) is one, so features.py imports this module, never the
other way round.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.core import labels
from service.core.errors import MetadataError

DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII digits only
EXAMPLE = '{"age": 55, "sex": "male", "site": "back"}'


class MetadataVocabulary(BaseModel):
    """The metadata a bundle accepts: its age range, sexes and sites (HAM10000's by default), as
    written in its manifest's feature encoder."""

    sexes: list[str] = Field(labels.SEXES, min_length=1)
    sites: list[str] = Field(labels.SITES, min_length=1)
    age_min: float = Field(labels.AGE_RANGE[0], allow_inf_nan=False)
    age_max: float = Field(labels.AGE_RANGE[1], allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent_vocabulary(self) -> MetadataVocabulary:
        if self.age_min > self.age_max:
            raise ValueError(f"age_min {self.age_min} is above age_max {self.age_max}")
        for name in ("sexes", "sites"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} repeat: {values}")
        return self

    def metadata_schema(self) -> dict:
        """What a client may send, as shown by the API's /model."""
        return {"age_min": self.age_min, "age_max": self.age_max, "sexes": self.sexes, "sites": self.sites}


class ClinicalMetadata(BaseModel):
    """One lesion's validated metadata. `None` / "unknown" mean unknown."""

    age: float | None = Field(default=None, description="Age in years; null if unknown", examples=[55])
    sex: str = Field(default="unknown", examples=["male"])
    site: str = Field(default="unknown", description="Anatomical site (HAM10000 `localization`)", examples=["back"])


class MetadataIn(BaseModel):
    """The metadata object a client sends (before the bundle's vocabulary is checked)."""

    model_config = ConfigDict(extra="forbid")
    age: float | None = Field(None, allow_inf_nan=False, description="years", examples=[55])
    sex: str | None = Field(None, examples=["male"])
    site: str | None = Field(
        None,
        validation_alias=AliasChoices("site", "localization"),
        description="anatomical site; `localization` is accepted too",
        examples=["back"],
    )

    @field_validator("age", mode="before")
    @classmethod
    def _age(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number of years, not true/false")
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, str) and not DECIMAL.fullmatch(v.strip()):  # Python's float() also reads "1_0" as 10
            raise ValueError("must be a number of years written in decimal, such as 55 or 42.5")
        return v

    @field_validator("sex", "site", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            raise ValueError("must be a string")
        return v


def metadata_json_schema(spec: MetadataVocabulary) -> dict:
    """The JSON schema of the metadata object a bundle with encoder `spec` accepts (its allowed values)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "age": {
                "type": ["number", "null"],
                "minimum": spec.age_min,
                "maximum": spec.age_max,
                "description": "years",
            },
            "sex": {"type": ["string", "null"], "enum": [*spec.sexes, None]},
            "site": {"type": ["string", "null"], "enum": [*spec.sites, None], "description": "anatomical site"},
            "localization": {"type": ["string", "null"], "description": "HAM10000's name for site"},
        },
        "examples": [json.loads(EXAMPLE)],
    }


def _normalise(value: str | None) -> str:
    value = (value or "").strip().lower().replace("_", " ")
    return " ".join(value.split()) or "unknown"


def validate_metadata(value: ClinicalMetadata | Mapping[str, Any] | None, spec: MetadataVocabulary) -> ClinicalMetadata:
    """Check one lesion's metadata against a bundle's encoder; raises MetadataError."""
    if value is None:
        return ClinicalMetadata()
    if isinstance(value, ClinicalMetadata):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise MetadataError(f"metadata must be a JSON object, e.g. {EXAMPLE}")
    value = dict(value)
    if "site" in value and "localization" in value:
        if value["site"] != value.pop("localization"):
            raise MetadataError("metadata has both 'site' and 'localization' with different values; send one")
    try:
        m = MetadataIn.model_validate(value)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            raise MetadataError(f"unknown metadata field '{field}'; allowed fields: age, sex, site") from None
        raise MetadataError(f"metadata field '{field}': {e['msg'].removeprefix('Value error, ')}") from None
    if m.age is not None and not (math.isfinite(m.age) and spec.age_min <= m.age <= spec.age_max):
        raise MetadataError(f"age {m.age:g} is outside {spec.age_min:g}-{spec.age_max:g}")
    sex, site = _normalise(m.sex), _normalise(m.site)
    if sex not in spec.sexes:
        raise MetadataError(f"sex '{m.sex}' is not allowed; use one of: {', '.join(spec.sexes)}")
    if site not in spec.sites:
        raise MetadataError(f"site '{m.site}' is not allowed; use one of: {', '.join(spec.sites)}")
    return ClinicalMetadata(age=m.age, sex=sex, site=site)


def parse_json(raw: str | None, field: str = "metadata", example: str = EXAMPLE) -> Any:
    """A form field's JSON text parsed; None when absent or blank. Any parse failure is a MetadataError."""
    if raw is None or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MetadataError(
            f"{field} is not valid JSON ({exc.msg} at position {exc.pos}); send e.g. {example}"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits, or nesting too deep
        raise MetadataError(f"{field} JSON cannot be read ({type(exc).__name__}); send e.g. {example}") from None


def metadata_from_json(raw: str | None, spec: MetadataVocabulary) -> ClinicalMetadata:
    """The metadata of one image, from JSON text."""
    return validate_metadata(parse_json(raw), spec)


def metadata_objects_from_json(raw: str | None, n: int) -> list[Any]:
    """The metadata of n images, from a JSON list (or nothing: all unknown), each still to be validated."""
    value = parse_json(raw)
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise MetadataError(f"metadata must be a JSON list with one object per image ({n} images)")
    return value
