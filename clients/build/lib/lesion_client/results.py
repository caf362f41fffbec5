"""Typed results of the API's JSON answers (unknown fields from newer servers are ignored)."""

from __future__ import annotations

from dataclasses import dataclass


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
class Prediction:
    """One image's answer: the served model's probabilities and every model's, with the bundle that
    answered and the research-use notice (which starts with DEMO MODEL for a synthetic-data bundle)."""

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
        )
