"""The HAM10000 vocabulary: diagnosis codes, sexes and anatomical sites.

Training validates its CSV against these and writes them into the bundle's manifest;
the service validates requests against the manifest's copy, so a bundle carries its own schema.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASSES: list[str] = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]

CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

MALIGNANT_CLASSES: list[str] = ["akiec", "bcc", "mel"]

SEXES: list[str] = ["male", "female", "unknown"]

SITES: list[str] = [
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "unknown",
    "upper extremity",
]

AGE_RANGE: tuple[float, float] = (0.0, 120.0)


def malignant_scores(
    probs: np.ndarray, classes: Sequence[str] = CLASSES, malignant: Sequence[str] = MALIGNANT_CLASSES
) -> np.ndarray:
    """(..., C) class probabilities -> (...) the malignant classes' probabilities summed: the one
    malignant score of training's figures, the service's answers and their metrics."""
    idx = [list(classes).index(c) for c in malignant]
    return np.asarray(probs, np.float64)[..., idx].sum(-1)
