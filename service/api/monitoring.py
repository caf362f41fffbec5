"""What the model does in production, against what it did out-of-fold: the drift window.

Each worker keeps its last `size` answers (the served model's top-1 class as trained, and the
CNN's OOD score) and compares their shares with the bundle's out-of-fold baseline
(`manifest.monitoring`) by the population stability index, PSI = sum (a - e) ln(a / e) over the
classes (or over 10 equal-share bins of the OOD score), once the window is full. PSI under 0.1 is
read as stable, 0.1-0.25 as a moderate shift, above 0.25 as a large one. A load balancer gives every worker a sample of the
same traffic, so each worker's gauge estimates the same drift; Prometheus keeps one series per live
worker (`pid`) and the alert takes their maximum (deploy/prometheus/alerts.yml).

What one client can do to it: an image already in the window (the same pixels at the model's input)
is not counted again, so resending one image, or a batch of copies, moves nothing. A client sending
many *different* images (new files, or one image re-encoded or slightly altered) still fills the
window with them: it can raise the gauge or dilute a real shift. Limit what one client may send at
the gateway (per-key rate limits) where that matters; the gauge reads the traffic, not the clinic.
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
        self.keys: deque[bytes] = deque(maxlen=size)  # the images in the window, by digest, in order
        self.held: set[bytes] = set()  # the same digests, to look up (never a key twice: a copy is refused)

    def add(self, label: int, ood_score: float | None, key: bytes | None = None) -> bool:
        """Count one answer, unless its image (`key`: a digest of the model's input) is in the window
        already: a client resending one image cannot move the gauges. Returns whether it counted."""
        if key is not None:
            if key in self.held:
                return False
            if len(self.keys) == self.keys.maxlen:
                self.held.discard(self.keys[0])  # about to leave the window
            self.keys.append(key)
            self.held.add(key)
        self.labels.append(label)
        if ood_score is not None:
            self.scores.append(ood_score)
        return True

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
