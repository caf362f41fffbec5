"""The drift window's arithmetic on hand-computed cases (service/api/monitoring.py): the PSI with its
floor, when the gauges start, which answers a window holds, and the OOD score's bins.
tests/api/test_monitoring.py checks the same against the tiny run's baseline and the running app."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.api.monitoring import FLOOR, DriftWindow, psi
from service.core.manifest import Manifest

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def window(manifest: dict, size: int, shares: dict | None = None, edges: list | None = None) -> DriftWindow:
    if shares is not None:
        manifest["monitoring"] = {"label_shares": shares, "ood_score_edges": edges or []}
    return DriftWindow(Manifest.model_validate(manifest), size)


def by_hand(actual: list[float], expected: list[float]) -> float:
    return sum((a - e) * math.log(a / e) for a, e in zip(actual, expected))


def test_psi_by_hand_and_its_floor():
    assert psi(np.array([0.2, 0.8]), np.array([0.5, 0.5])) == pytest.approx(by_hand([0.2, 0.8], [0.5, 0.5]))
    # a share of 0 counts as FLOOR (1e-4), on either side, so the PSI stays finite
    assert FLOOR == 1e-4
    assert psi(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(by_hand([1.0, 1e-4], [0.5, 0.5]))
    assert psi(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(by_hand([0.5, 0.5], [1.0, 1e-4]))
    assert psi(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == 0.0


def test_no_baseline_no_gauges(manifest):
    w = window(manifest, 2)
    assert w.expected is None and w.edges is None
    for _ in range(3):
        w.add(0, 0.5)
    assert w.label_psi() is None and w.ood_psi() is None


def test_the_baseline_gives_0_to_a_class_it_does_not_name(manifest):
    w = window(manifest, 2, {"nv": 0.75, "mel": 0.25})
    assert w.expected.tolist() == [0, 0, 0, 0, 0.25, 0.75, 0] and w.edges is None
    assert w.classes == CLASSES


def test_the_label_gauge_waits_for_a_full_window_then_reads_its_last_answers(manifest):
    w = window(manifest, 4, {"nv": 0.5, "mel": 0.5})
    nv, mel, bcc = CLASSES.index("nv"), CLASSES.index("mel"), CLASSES.index("bcc")
    for label in (bcc, nv, nv):
        assert w.add(label, None) is True
        assert w.label_psi() is None  # under 4 answers: no figure
    w.add(mel, None)
    shares = [0, 0.25, 0, 0, 0.25, 0.5, 0]
    expected = [FLOOR, FLOOR, FLOOR, FLOOR, 0.5, 0.5, FLOOR]
    assert w.label_psi() == pytest.approx(by_hand([max(s, FLOOR) for s in shares], expected))
    w.add(mel, None)  # the first answer (bcc) leaves: nv, nv, mel, mel
    assert list(w.labels) == [nv, nv, mel, mel]
    assert w.label_psi() == pytest.approx(by_hand([FLOOR] * 4 + [0.5, 0.5, FLOOR], expected)) == pytest.approx(0)


def test_an_image_already_in_the_window_is_not_counted_until_it_leaves(manifest):
    w = window(manifest, 2, {"nv": 1.0})
    assert w.add(5, 0.1, b"a") and not w.add(5, 0.1, b"a")
    assert list(w.labels) == [5] and list(w.scores) == [0.1]
    assert w.add(4, 0.2, b"b")  # the window is full: a, b
    assert not w.add(4, 0.2, b"b") and not w.add(5, 0.1, b"a")
    assert w.add(3, 0.3, b"c")  # a leaves
    assert w.held == {b"b", b"c"} and list(w.keys) == [b"b", b"c"]
    assert w.add(5, 0.1, b"a")  # counted again once it has left; b leaves
    assert w.held == {b"c", b"a"} and list(w.labels) == [3, 5]
    assert w.add(6, None) and w.add(6, None)  # no key: every answer counts
    assert list(w.labels) == [6, 6] and list(w.scores) == [0.3, 0.1]  # no score: only the label counts


def test_the_ood_gauge_bins_scores_by_the_baselines_edges(manifest):
    """Edges 1 and 2: bins (-inf, 1), [1, 2), [2, inf), each expected to hold a third of the scores."""
    w = window(manifest, 4, {"nv": 1.0}, edges=[1.0, 2.0])
    assert w.edges.tolist() == [1.0, 2.0]
    for score in (0.5, 1.0, 1.5):
        w.add(5, score)
        assert w.ood_psi() is None
    w.add(5, 2.0)  # a score on an edge goes to the bin above it: bins 0, 1, 1, 2
    third = 1 / 3
    assert w.ood_psi() == pytest.approx(by_hand([0.25, 0.5, 0.25], [third] * 3))
    w.add(5, 2.5)  # 0.5 leaves: bins 1, 1, 2, 2
    assert w.ood_psi() == pytest.approx(by_hand([FLOOR, 0.5, 0.5], [third] * 3))


def test_scores_under_the_first_edge_fill_the_first_of_ten_bins(manifest):
    """The baseline's 9 inner edges: 10 bins expected to hold a tenth each; the top bins empty here."""
    edges = [float(e) for e in range(1, 10)]
    w = window(manifest, 3, {"nv": 1.0}, edges=edges)
    for score in (0.1, 0.5, 0.9):
        w.add(5, score)
    assert w.ood_psi() == pytest.approx(by_hand([1.0] + [FLOOR] * 9, [0.1] * 10))
    for score in (1.0, 9.5, 9.9):  # bins 1, 9 and 9
        w.add(5, score)
    assert w.ood_psi() == pytest.approx(by_hand([FLOOR, 1 / 3] + [FLOOR] * 7 + [2 / 3], [0.1] * 10))
