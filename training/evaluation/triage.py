"""Triage operating points (service/core/triage.py says what they promise), chosen on the served
answer for rows no model that scores them trained on (the calibration lesions through the served
models, or the fold models' out-of-fold answers: training/stages/triage.py).

For a target sensitivity, the threshold is the largest malignant score that still refers that share
of the malignant images it is chosen on. Each fold's images are decided by the threshold chosen on
the other folds' rows (nested), and the promised figures are measured on those decisions, with
lesion-bootstrap intervals; the served threshold is chosen on every row.
Lesion answers get their own points, chosen the same way on lesions (one row each, its images
combined by the bundle's lesion rule, as the service combines them).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from service.core.labels import malignant_scores
from service.core.lesions import combine_by_group, group_codes
from service.core.triage import Figure, OperatingPoint, TriageSpec, point_name
from training.evaluation.metrics import _ci, lesion_bootstrap_weights


def threshold_for(scores: np.ndarray, malignant: np.ndarray, target: float) -> float:
    """The largest threshold t whose referrals (score >= t) include at least `target` of the malignant rows."""
    positive = np.sort(np.asarray(scores, np.float64)[np.asarray(malignant, bool)])[::-1]
    if len(positive) == 0:
        raise ValueError("no malignant image to choose a triage threshold on")
    needed = max(1, math.ceil(target * len(positive) - 1e-9))  # malignant rows that must be referred
    return float(positive[needed - 1])


def nested_thresholds(scores: np.ndarray, malignant: np.ndarray, fold: np.ndarray, target: float) -> np.ndarray:
    """Per row: the threshold chosen on the rows of every other fold (never on its own fold)."""
    out = np.empty(len(scores))
    for k in np.unique(fold):
        rows = fold == k
        out[rows] = threshold_for(scores[~rows], malignant[~rows], target)
    return out


def decision_figures(refer: np.ndarray, malignant: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Sensitivity, specificity, referral share, PPV and NPV of refer/routine decisions (weighted rows)."""
    w = np.ones(len(refer)) if weights is None else weights
    pos, neg = malignant.astype(bool), ~malignant.astype(bool)

    def share(num: np.ndarray, den: np.ndarray) -> float:
        total = w[den].sum()
        return float(w[num & den].sum() / total) if total > 0 else math.nan

    everyone = np.ones(len(refer), bool)
    return {
        "sensitivity": share(refer, pos),
        "specificity": share(~refer, neg),
        "referral_share": share(refer, everyone),
        "ppv": share(pos, refer),
        "npv": share(neg, ~refer),
    }


def operating_point(
    scores: np.ndarray,
    malignant: np.ndarray,
    fold: np.ndarray,
    lesions: np.ndarray,
    target: float,
    n_boot: int,
    seed: int,
) -> OperatingPoint:
    refer = scores >= nested_thresholds(scores, malignant, fold, target)
    point = decision_figures(refer, malignant)
    reps = [decision_figures(refer, malignant, w) for w in lesion_bootstrap_weights(lesions, n_boot, seed)]
    figures = {k: Figure(value=v, ci95=_ci([r[k] for r in reps])) for k, v in point.items()}
    return OperatingPoint(
        name=point_name(target),
        target_sensitivity=target,
        threshold=threshold_for(scores, malignant, target),
        **figures,
    )


def choose_points(
    probs: np.ndarray,
    malignant: np.ndarray,
    fold: np.ndarray,
    lesions: np.ndarray,
    rule: str,
    targets: list[float],
    default: float,
    n_boot: int,
    seed: int,
    source: Literal["calibration", "out-of-fold"],
    measured_on: str,
) -> TriageSpec:
    """Every target's operating point on the served answer's probabilities for rows no model that
    gave them trained on (`measured_on` says which): per image, and per lesion (its images combined
    by the lesion `rule`; a lesion's images share a fold). Each fold is decided by the threshold
    chosen on the others' rows."""
    ids, codes = group_codes(lesions)
    first = np.unique(codes, return_index=True)[1]  # a lesion's row: its first image (fold, diagnosis)
    lesion_scores = malignant_scores(combine_by_group(probs, codes, rule))
    image_scores = malignant_scores(probs)
    targets = sorted(targets)
    return TriageSpec(
        points=[operating_point(image_scores, malignant, fold, lesions, t, n_boot, seed) for t in targets],
        lesion_points=[
            operating_point(lesion_scores, malignant[first], fold[first], np.asarray(ids), t, n_boot, seed)
            for t in targets
        ],
        default=point_name(default),
        images=len(probs),
        lesions=len(ids),
        source=source,
        measured_on=measured_on,
    )


def check_points(
    scores: np.ndarray,
    malignant: np.ndarray,
    lesions: np.ndarray,
    points: list[OperatingPoint],
    n_boot: int,
    seed: int,
) -> list[dict]:
    """Each point's threshold applied to new labelled data: what it achieves, with lesion-bootstrap
    intervals, beside what it promised. A promise does not hold when the new data's whole
    95% interval lies below the promised figure."""
    out = []
    for p in points:
        refer = scores >= p.threshold
        achieved = decision_figures(refer, malignant)
        reps = [decision_figures(refer, malignant, w) for w in lesion_bootstrap_weights(lesions, n_boot, seed)]
        row: dict = {"point": p.name, "threshold": p.threshold, "target_sensitivity": p.target_sensitivity}
        for k in ("sensitivity", "specificity", "referral_share"):
            ci = _ci([r[k] for r in reps])
            promised = getattr(p, k)
            row[k] = {"value": achieved[k], "ci95": ci, "promised": promised.value, "promised_ci95": promised.ci95}
        row["holds"] = all(row[k]["ci95"][1] >= row[k]["promised"] for k in ("sensitivity", "specificity"))
        out.append(row)
    return out


def check_lines(title: str, rows: list[dict]) -> list[str]:
    """A markdown table of `check_points`: achieved beside promised, and whether each promise holds."""
    fmt = lambda f: f"{f['value']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]"  # noqa: E731
    lines = [
        f"## {title}",
        "",
        "| point | threshold | sensitivity here | promised | specificity here | promised | referred here | holds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, sp = r["sensitivity"], r["specificity"]
        lines.append(
            f"| {r['point']} | {r['threshold']:.4f} | {fmt(s)} | {s['promised']:.3f} | {fmt(sp)} | {sp['promised']:.3f} "
            f"| {fmt(r['referral_share'])} | {'yes' if r['holds'] else '**no**'} |"
        )
    broken = [r["point"] for r in rows if not r["holds"]]
    lines += [
        "",
        f"The promise of {', '.join(broken)} does not hold on this data: its whole 95% interval lies below what "
        "the bundle promised."
        if broken
        else "Every point's promise holds here: no achieved interval lies wholly below its promised figure.",
    ]
    return lines
