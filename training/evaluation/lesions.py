"""Lesion-level figures: each lesion's images combined into one answer (service/core/lesions.py, the
service's own rule), scored once per lesion with lesion-bootstrap intervals; and what combining
gains over answering each image alone, on the same images."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from service.core.lesions import combine_by_group, group_codes
from training.evaluation.metrics import MALIGNANT_IDX, with_intervals


def lesion_level(
    y: np.ndarray,
    lesion_ids: np.ndarray,
    model_probs: Mapping[str, np.ndarray],
    rule: str,
    n_boot: int,
    seed: int,
    paired: tuple[str, str],
) -> dict:
    """Every model's metrics over lesions (one row each, labelled by its images' diagnosis)."""
    ids, codes = group_codes(lesion_ids)
    first = np.unique(codes, return_index=True)[1]
    probs = {m: combine_by_group(p, codes, rule) for m, p in model_probs.items()}
    out = with_intervals(y[first], probs, np.asarray(ids), n_boot, seed, paired)
    counts = np.bincount(codes)
    return {"rule": rule, "lesions": len(ids), "multi_image_lesions": int((counts > 1).sum()), **out}


def lesion_gain(y: np.ndarray, lesion_ids: np.ndarray, probs: np.ndarray, rule: str, n_boot: int, seed: int) -> dict:
    """Per image: its own answer against its lesion's combined answer, paired on the same images;
    for all images and for the images of lesions with several."""
    _, codes = group_codes(lesion_ids)
    combined = combine_by_group(probs, codes, rule)[codes]
    several = np.bincount(codes)[codes] > 1
    out = {}
    for name, rows in (("all_images", np.ones(len(y), bool)), ("multi_image_lesions", several)):
        if len(np.unique(np.isin(y[rows], MALIGNANT_IDX))) < 2:  # AUCs need malignant and benign images
            continue
        figures = with_intervals(
            y[rows],
            {"per_lesion": combined[rows], "per_image": probs[rows]},
            lesion_ids[rows],
            n_boot,
            seed,
            paired=("per_lesion", "per_image"),
        )
        out[name] = {"images": int(rows.sum()), **figures}
    return out
