"""What a prediction tells a person, read once: the top-1 label, the malignant probability, the
out-of-distribution verdict and the warnings, for one image and for a lesion of several.

Every route, the metrics and the lesion answers read these numbers from here, so a label or a
malignant probability has one definition (the schemas only format them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.core.labels import malignant_scores
from service.core.lesions import combine_by_group
from service.core.manifest import Manifest
from service.core.ood import IMAGE_CHECK, OodSpec
from service.core.predictor import Prediction


def top_label(manifest: Manifest, probabilities: np.ndarray) -> str:
    """The predicted class: the most probable one (ties: the first in the manifest's order)."""
    return manifest.classes[int(np.argmax(probabilities))]


def malignant_probability(manifest: Manifest, probabilities: np.ndarray) -> float:
    """The sum of the malignant classes' probabilities (mel + bcc + akiec for HAM10000)."""
    return float(malignant_scores(probabilities, manifest.classes, manifest.malignant_classes))


@dataclass(frozen=True)
class OodVerdict:
    """How unlike the training images one upload is, and which checks flag it."""

    spec: OodSpec
    score: float  # the served method's score, from the CNN
    image_score: float | None  # the image-statistics score (None: the bundle has no such check)
    flagged_by: list[str]  # the served method and/or IMAGE_CHECK

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_by)

    def warning(self) -> str | None:
        """The flag as a sentence for a person (None: not flagged)."""
        spec, why = self.spec, []
        if spec.method in self.flagged_by:
            why.append(f"to the CNN: {spec.method} score {self.score:.3g} > {spec.threshold:.3g}")
        if IMAGE_CHECK in self.flagged_by:
            why.append(f"in colour and texture: image score {self.image_score:.3g} > {spec.image_threshold:.3g}")
        if not why:
            return None
        return (
            "out of distribution: this image is unlike the dermoscopy images the model was trained on "
            f"({'; '.join(why)}); the answer may be meaningless"
        )


def ood_verdict(manifest: Manifest, pred: Prediction) -> OodVerdict | None:
    spec = manifest.ood
    if spec is None or pred.ood_score is None:
        return None
    flagged = spec.flagged_by(pred.ood_score, pred.image_ood_score)
    return OodVerdict(spec, pred.ood_score, pred.image_ood_score, flagged)


@dataclass(frozen=True)
class Answer:
    """One image's answer: every model's probabilities under the request's prior, the served one's
    label and malignant probability, the out-of-distribution verdict and the warnings (image quality,
    then out of distribution)."""

    prediction: Prediction  # under the request's prior
    prior: str  # the prior's name: balanced, training or custom
    label: str
    malignant_probability: float
    ood: OodVerdict | None
    warnings: list[str]

    @property
    def probabilities(self) -> np.ndarray:
        return self.prediction.probabilities

    @property
    def ood_flagged(self) -> bool:
        return self.ood is not None and self.ood.flagged


def answer(
    manifest: Manifest,
    pred: Prediction,
    prior: str,
    adjust: tuple[np.ndarray, float] | None,
    quality: Sequence[str] = (),
) -> Answer:
    """The answer to `pred` (as trained) under a prior: `adjust` is what `Predictor.prior` gave for
    it (None: as trained). The OOD verdict reads the scores, which no prior moves."""
    moved = pred if adjust is None else pred.under_prior(*adjust)
    verdict = ood_verdict(manifest, pred)
    flag = verdict.warning() if verdict is not None else None
    return Answer(
        prediction=moved,
        prior=prior,
        label=top_label(manifest, moved.probabilities),
        malignant_probability=malignant_probability(manifest, moved.probabilities),
        ood=verdict,
        warnings=[*quality, *([flag] if flag else [])],
    )


@dataclass(frozen=True)
class LesionVerdict:
    """A lesion's images' served probabilities combined by the bundle's lesion rule."""

    probabilities: np.ndarray
    label: str
    malignant_probability: float


def lesion_verdict(manifest: Manifest, answers: Sequence[Answer]) -> LesionVerdict:
    probs = np.stack([a.probabilities for a in answers])
    combined = combine_by_group(probs, np.zeros(len(answers), np.int64), manifest.lesion_rule)[0]
    return LesionVerdict(combined, top_label(manifest, combined), malignant_probability(manifest, combined))
