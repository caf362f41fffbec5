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
from service.core.triage import BASIS, Decision, OperatingPoint


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
class Triage:
    """Refer or routine at one operating point, decided on the malignant probability as trained."""

    point: OperatingPoint
    decision: Decision
    score: float  # the served model's malignant probability as trained (balanced prior)
    reason: str  # the decision in words: the comparison, or why the image cannot be triaged

    @property
    def basis(self) -> str:
        return BASIS


def decide(op: OperatingPoint, score: float, warnings: Sequence[str]) -> Triage:
    """Refer when `score` (the malignant probability as trained) reaches the point's threshold;
    an image or lesion with a warning (image quality, out of distribution) gets no routine: it
    cannot be triaged, and says why."""
    if warnings:
        return Triage(op, "not-triaged", score, f"cannot be triaged: {'; '.join(warnings)}")
    refer = score >= op.threshold
    reason = (
        f"{'refer' if refer else 'routine'}: malignant probability {score:.3f} {'>=' if refer else '<'} "
        f"{op.threshold:.3f}, the threshold for {op.target_sensitivity:.0%} sensitivity (as measured: sensitivity "
        f"{op.sensitivity.value:.1%}, specificity {op.specificity.value:.1%})"
    )
    return Triage(op, "refer" if refer else "routine", score, reason)


def triage(manifest: Manifest, pred: Prediction, point: str | None, warnings: Sequence[str]) -> Triage | None:
    """The decision for one image at the named point (None: the bundle's default), on `pred` as
    trained. None for a bundle without operating points; KeyError for a point it does not have."""
    if manifest.triage is None:
        return None
    return decide(manifest.triage.point(point), malignant_probability(manifest, pred.probabilities), warnings)


@dataclass(frozen=True)
class Answer:
    """One image's answer: every model's probabilities under the request's prior, the served one's
    label and malignant probability, the out-of-distribution verdict and the warnings (image quality,
    then out of distribution)."""

    prediction: Prediction  # under the request's prior
    trained: Prediction  # as trained (the balanced prior): what triage and lesion triage read
    prior: str  # the prior's name: balanced, training or custom
    label: str
    malignant_probability: float
    ood: OodVerdict | None
    warnings: list[str]
    triage: Triage | None = None  # None: the bundle has no operating points

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
    point: str | None = None,
) -> Answer:
    """The answer to `pred` (as trained) under a prior: `adjust` is what `Predictor.prior` gave for
    it (None: as trained). The OOD verdict and the triage at `point` (None: the default) read
    `pred` as trained, which no prior moves."""
    moved = pred if adjust is None else pred.under_prior(*adjust)
    verdict = ood_verdict(manifest, pred)
    flag = verdict.warning() if verdict is not None else None
    warnings = [*quality, *([flag] if flag else [])]
    return Answer(
        prediction=moved,
        trained=pred,
        prior=prior,
        label=top_label(manifest, moved.probabilities),
        malignant_probability=malignant_probability(manifest, moved.probabilities),
        ood=verdict,
        warnings=warnings,
        triage=triage(manifest, pred, point, warnings),
    )


@dataclass(frozen=True)
class LesionVerdict:
    """A lesion's images' served probabilities combined by the bundle's lesion rule (under the
    request's prior), and its triage on the combination as trained at the lesion operating point."""

    probabilities: np.ndarray
    label: str
    malignant_probability: float
    triage: Triage | None  # None: the bundle has no lesion operating points


def combined(manifest: Manifest, probabilities: Sequence[np.ndarray]) -> np.ndarray:
    return combine_by_group(np.stack(probabilities), np.zeros(len(probabilities), np.int64), manifest.lesion_rule)[0]


def lesion_verdict(manifest: Manifest, answers: Sequence[Answer], point: str | None = None) -> LesionVerdict:
    """`answers`: the lesion's answered images; `point` as for `answer`. A lesion any of whose
    images has a warning is not triaged."""
    shown = combined(manifest, [a.probabilities for a in answers])
    decision = None
    if manifest.triage is not None and manifest.triage.lesion_points:
        trained = combined(manifest, [a.trained.probabilities for a in answers])
        warned = [f"its image {i + 1} of {len(answers)}: {w}" for i, a in enumerate(answers) for w in a.warnings]
        op = manifest.triage.point(point, lesion=True)
        decision = decide(op, malignant_probability(manifest, trained), warned)
    return LesionVerdict(shown, top_label(manifest, shown), malignant_probability(manifest, shown), decision)
