"""What the model does in production, against what it did out-of-fold: the drift window.

Each worker keeps its last `size` answers (the served model's top-1 class as trained, and the
CNN's OOD score) and compares their shares with the bundle's out-of-fold baseline
(`manifest.monitoring`) by the population stability index, PSI = sum (a - e) ln(a / e) over the
classes (or over 10 equal-share bins of the OOD score), once the window is full. PSI under 0.1 is
read as stable, 0.1-0.25 as a moderate shift, above 0.25 as a large one. A load balancer gives every worker a sample of the
same traffic, so each worker's gauge estimates the same drift; Prometheus keeps one series per live
worker (`pid`) and the alert takes their maximum (deploy/prometheus/alerts.yml).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from service.core.manifest import Manifest

FLOOR = 1e-4  # a share never counts as 0 in the PSI's logarithm


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = np.maximum(actual, FLOOR), np.maximum(expected, FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftWindow:
    """The last `size` answers of one bundle in this worker, and their PSI against its baseline."""

    def __init__(self, manifest: Manifest, size: int) -> None:
        ref = manifest.monitoring
        self.classes = manifest.classes
        self.expected = np.array([ref.label_shares.get(c, 0.0) for c in self.classes]) if ref else None
        self.edges = np.array(ref.ood_score_edges) if ref and ref.ood_score_edges else None
        # exported only once the window is full: over 50 answers drawn from the baseline itself, the PSI
        # passed 0.25 in 8-28 % of draws; over 500, in none
        self.min_answers = size
        self.labels: deque[int] = deque(maxlen=size)
        self.scores: deque[float] = deque(maxlen=size)

    def add(self, label: int, ood_score: float | None) -> None:
        self.labels.append(label)
        if ood_score is not None:
            self.scores.append(ood_score)

    def label_psi(self) -> float | None:
        if self.expected is None or len(self.labels) < self.min_answers:
            return None
        counts = np.bincount(np.fromiter(self.labels, int), minlength=len(self.classes))
        return psi(counts / counts.sum(), self.expected)

    def ood_psi(self) -> float | None:
        if self.edges is None or len(self.scores) < self.min_answers:
            return None
        bins = np.searchsorted(self.edges, np.fromiter(self.scores, float), side="right")
        counts = np.bincount(bins, minlength=len(self.edges) + 1)
        return psi(counts / counts.sum(), np.full(len(self.edges) + 1, 1 / (len(self.edges) + 1)))
