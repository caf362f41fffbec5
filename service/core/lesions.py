"""One answer per lesion from the answers for its images.

A lesion is often photographed more than once, and every view carries evidence. The rule that
combines the views' probabilities is chosen out-of-fold by training (training/ensemble/selection.py)
and named in the manifest; the service and training's lesion-level figures both combine through
`combine_by_group`, so they cannot drift apart.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import Literal

import numpy as np

from service.core.errors import LesionIdsError

LesionRule = Literal["mean", "log_mean"]
LESION_RULES: tuple[LesionRule, ...] = ("mean", "log_mean")
RULE_TEXT = {
    "mean": "the mean of the images' probabilities",
    "log_mean": "the mean of the images' log-probabilities, renormalised (a geometric mean)",
}
EPS = 1e-12
MAX_LESION_ID = 128  # characters of one lesion id


def group_codes(lesion_ids: Sequence[str] | np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct lesion ids in order of first appearance, and each row's index among them."""
    ids: dict[str, int] = {}
    codes = np.array([ids.setdefault(str(i), len(ids)) for i in lesion_ids], dtype=np.int64)
    return list(ids), codes


def combine_by_group(probs: np.ndarray, codes: np.ndarray, rule: str) -> np.ndarray:
    """(N, C) probabilities of N images and each image's group index -> (G, C): each group's
    probabilities combined by `rule` (mean, or log_mean: the normalised geometric mean)."""
    if rule not in LESION_RULES:
        raise ValueError(f"unknown lesion rule {rule!r}; one of {', '.join(LESION_RULES)}")
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    values = np.asarray(probs, np.float64)
    if rule == "log_mean":
        values = np.log(np.clip(values, EPS, 1.0))
    sums = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, codes, values)
    means = sums / np.bincount(codes, minlength=n_groups)[:, None]
    if rule == "log_mean":
        means = np.exp(means - means.max(1, keepdims=True))
    return means / means.sum(1, keepdims=True)


def by_lesion(probs: np.ndarray, lesion_ids: Sequence[str] | np.ndarray, rule: str) -> tuple[list[str], np.ndarray]:
    """The distinct lesion ids (first-appearance order) and each one's combined probabilities."""
    ids, codes = group_codes(lesion_ids)
    return ids, combine_by_group(probs, codes, rule)


def lesion_ids_from_json(raw: str | None, n: int) -> list[str | None] | None:
    """A request's lesion ids: a JSON list with one id (a string, or null: not grouped) per image
    (None or blank: no grouping). Canonically equivalent spellings (NFC) are one lesion; case still
    matters ("L1" is not "l1"). Raises LesionIdsError."""
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, a number of thousands of digits, nesting too deep
        value = None
    ok = isinstance(value, list) and len(value) == n
    if not ok or not all(
        v is None or (isinstance(v, str) and 0 < len(v) <= MAX_LESION_ID and v.isprintable()) for v in value
    ):
        raise LesionIdsError(
            f"lesion_ids must be a JSON list with one lesion id per image ({n} images): a string of 1 to "
            f"{MAX_LESION_ID} printable characters, or null for an image of no lesion named"
        )
    ids = [None if v is None else unicodedata.normalize("NFC", v) for v in value]
    if any(v is not None and len(v) > MAX_LESION_ID for v in ids):
        raise LesionIdsError(f"lesion_ids: an id is over {MAX_LESION_ID} characters once normalised")
    return ids
