"""The int8 gate's decisions (training/cnn/quantize.py: gate_check, tune, gate_of) on probabilities
made up for the purpose, without exporting or quantizing a graph: tests/training/test_int8.py runs
the same on real ONNX graphs, in seconds per case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.manifest import GateCheck, QuantizationAttempt
from training.cnn import quantize
from training.evaluation.metrics import all_metrics

N = 140


def probs_for(y: np.ndarray, seed: int = 0, signal: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), 7)) + signal * np.eye(7)[y]
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


Y = np.arange(N) % 7
FP32 = probs_for(Y)


def gate(int8: np.ndarray, fp32: np.ndarray = FP32, y: np.ndarray = Y, n_boot: int = 2, seed: int = 0) -> GateCheck:
    return quantize.gate_check(y, np.arange(len(y)), (fp32, int8), (fp32, int8), n_boot, seed)


def test_the_relative_loss_is_the_share_of_the_fp32_figure_lost():
    """One row's top class moved to a wrong class: BMCA drops by 1/20 of one class's recall, by hand."""
    int8 = FP32.copy()
    row = np.flatnonzero(FP32.argmax(1) == Y)[0]
    int8[row] = np.roll(int8[row], 3)
    check = gate(int8)
    a, b = all_metrics(Y, FP32)["bmca"], all_metrics(Y, int8)["bmca"]
    assert b < a and check.metrics["bmca"].fp32 == a and check.metrics["bmca"].int8 == b
    assert check.metrics["bmca"].relative_loss == pytest.approx((a - b) / a, rel=1e-12)
    assert check.metrics["bmca"].relative_loss == pytest.approx(1 / 20 / 7 / a)  # 1 of 20 rows of 1 of 7 classes
    # the row is malignant (akiec): BMCA loses under 1 %, the malignant pAUC over 1 %, and one figure fails the gate
    assert Y[row] == 0 and check.metrics["bmca"].relative_loss < quantize.MAX_RELATIVE_LOSS
    assert check.metrics["malignant_pauc"].relative_loss > quantize.MAX_RELATIVE_LOSS and not check.passed
    assert check.answer_agreement == pytest.approx(1 - 1 / N) == check.cnn_agreement


def test_a_small_loss_passes_and_a_gain_is_kept_as_a_negative_loss():
    y = np.arange(7 * 200) % 7
    fp32 = probs_for(y, seed=1, signal=6.0)
    int8 = fp32.copy()
    row = np.flatnonzero(fp32.argmax(1) == y)[0]
    int8[row] = np.roll(int8[row], 3)  # one row of 1400: a loss of under 1 %
    check = gate(int8, fp32, y)
    loss = check.metrics["bmca"].relative_loss
    assert 0 < loss < quantize.MAX_RELATIVE_LOSS and check.passed
    assert loss == pytest.approx((check.metrics["bmca"].fp32 - check.metrics["bmca"].int8) / check.metrics["bmca"].fp32)
    back = gate(fp32, int8, y)  # the other way round: int8 better than fp32
    assert back.metrics["bmca"].relative_loss < 0 and back.passed


def test_a_zero_fp32_figure_can_only_be_kept():
    """Every top-1 right, but each benign row gives the malignant classes more than any malignant row
    does: the fp32 malignant AUC and pAUC are 0, and an int8 answer as bad keeps them."""
    y = np.arange(N) % 7
    malignant = np.isin(y, [0, 1, 4])
    probs = np.zeros((N, 7))
    probs[np.ix_(malignant, [2, 3, 5, 6])] = 0.125  # malignant rows: 0.5 on their class, a score of 0.5
    probs[np.ix_(~malignant, [0, 1, 4])] = 0.2  # benign rows: 0.4 on their class, a score of 0.6
    probs[np.arange(N), y] = np.where(malignant, 0.5, 0.4)
    check = gate(probs.copy(), probs, y)
    assert all_metrics(y, probs)["bmca"] == 1
    for k in ("malignant_auc", "malignant_pauc"):
        assert check.metrics[k].fp32 == 0 and check.metrics[k].relative_loss == 0
    assert check.passed


def test_the_seed_draws_the_bootstrap_and_repeats_it():
    int8 = probs_for(Y, seed=5)
    one, again, other = gate(int8, n_boot=3, seed=1), gate(int8, n_boot=3, seed=1), gate(int8, n_boot=3, seed=0)
    assert one == again
    assert one.metrics["bmca"].difference_ci95 != other.metrics["bmca"].difference_ci95


class Graphs:
    """What `tune` reads of FoldGraphs: the fp32 probabilities and, per configuration, the int8 ones."""

    def __init__(self, passing: int | None) -> None:
        self.fp32 = FP32
        self.passing = passing  # the first configuration whose int8 answer is the fp32 one
        self.asked: list[tuple[str, int]] = []

    def quantize(self, rung: quantize.Rung, index: int) -> tuple[np.ndarray, list[Path], list[str]]:
        self.asked.append((rung.name, index))
        int8 = FP32.copy() if self.passing is not None and index >= self.passing else probs_for(Y, seed=9, signal=0)
        return int8, [Path(f"fold{k}.rung{index}.int8.onnx") for k in range(2)], [f"node{index}"]


def test_tune_stops_at_the_first_passing_configuration():
    graphs, logged = Graphs(passing=1), []
    attempts, paths = quantize.tune(graphs, Y, np.arange(N), lambda p: p, 2, 0, log=logged.append)
    names = [r.name for r in quantize.LADDER]
    assert graphs.asked == [(names[0], 0), (names[1], 1)]
    assert [a.config for a in attempts] == names[:2] and [a.passed for a in attempts] == [False, True]
    assert [a.fp32_nodes for a in attempts] == [["node0"], ["node1"]] and attempts[1].refit is None
    assert paths == [
        [Path("fold0.rung0.int8.onnx"), Path("fold1.rung0.int8.onnx")],
        graphs.quantize(quantize.LADDER[1], 1)[1],
    ]
    assert len(logged) == 2 and logged[0].startswith(f"int8 [{names[0]}] fold models") and "failed" in logged[0]
    for k in quantize.GATED:  # each figure, fp32 -> int8, with the change as a signed percentage: a loss
        assert f"{k} {attempts[0].folds.metrics[k].fp32:.4f} -> {attempts[0].folds.metrics[k].int8:.4f} (-" in logged[0]
    assert logged[1].startswith(f"int8 [{names[1]}] fold models, served answer out-of-fold: passed")


def test_tune_repeats_with_the_seed():
    def run():
        return quantize.tune(Graphs(passing=2), Y, np.arange(N), lambda p: p, 3, 7, log=lambda m: None)[0]

    assert run() == run()


def test_tune_measures_the_answer_not_the_cnn():
    """`answer` maps CNN probabilities to the served answer: here it ignores them, so nothing is lost."""
    attempts, _ = quantize.tune(Graphs(passing=None), Y, np.arange(N), lambda p: FP32, 2, 0, log=lambda m: None)
    assert len(attempts) == 1 and attempts[0].passed and attempts[0].folds.cnn_agreement < 0.5


def test_the_refit_check_runs_only_after_the_folds_pass_and_decides_with_them():
    refit_checks = {1: False, 2: True}
    asked, logged = [], []

    def refit(rung: quantize.Rung, i: int) -> GateCheck:
        asked.append((rung.name, i))
        return GateCheck(images=3, passed=refit_checks[i], metrics={}, cnn_agreement=1.0, answer_agreement=1.0)

    attempts, _ = quantize.tune(Graphs(passing=1), Y, np.arange(N), lambda p: p, 2, 0, refit=refit, log=logged.append)
    assert asked == [(quantize.LADDER[1].name, 1), (quantize.LADDER[2].name, 2)]  # not for the failing rung 0
    assert [a.refit is None for a in attempts] == [True, False, False]
    assert [a.passed for a in attempts] == [False, False, True]
    assert len(logged) == 5 and logged[2].startswith(f"int8 [{quantize.LADDER[1].name}] refit model")
    assert "failed" in logged[2] and "passed" in logged[4]


def attempt(config: str, passed: bool, images: int = 10, agreement: float = 0.5) -> QuantizationAttempt:
    folds = GateCheck(images=images, passed=passed, metrics={}, cnn_agreement=agreement, answer_agreement=1.0)
    return QuantizationAttempt(config=config, fp32_nodes=[f"{config}-node"], folds=folds)


def test_the_gate_records_the_first_passing_configuration():
    attempts = [attempt("a", False, 9, 0.1), attempt("b", True, 10, 0.7), attempt("c", True, 11, 0.9)]
    g = quantize.gate_of(attempts, "refit", "stack")
    assert g.passed and g.config == "b" and g.fp32_nodes == ["b-node"] and g.images == 10 and g.agreement == 0.7
    assert g.served_model == "refit" and g.answer == "stack" and g.attempts == attempts
    assert g.rule == quantize.RULE and g.max_relative_loss == quantize.MAX_RELATIVE_LOSS == 0.01


def test_with_none_passing_the_gate_fails_on_the_last_configuration_tried():
    tried = [attempt("a", False, 9, 0.1), attempt("b", False, 12, 0.2), attempt("c", False, 13, 0.3)]
    g = quantize.gate_of(tried, "fold ensemble", "cnn")
    assert not g.passed and g.config == "c" and g.images == 13 and g.agreement == 0.3 and g.fp32_nodes == ["c-node"]


@pytest.mark.parametrize("int8, passed", [(0.13464, True), (0.1346, False)])
def test_a_loss_of_exactly_the_limit_passes(monkeypatch, int8, passed):
    """The rule is "at most 1 %": a pAUC of 0.136 -> 0.13464 loses exactly 0.01 (in floating point too)."""
    fp32 = {"bmca": 0.8, "malignant_auc": 0.9, "malignant_pauc": 0.136}

    def figures(y, probs, lesions, n_boot, seed, paired):
        out = {m: {k: {"value": v} for k, v in fp32.items()} for m in ("fp32", "int8")}
        out["int8"]["malignant_pauc"]["value"] = int8
        return {"models": out, "paired_difference": {k: {"ci95": [0.0, 0.0]} for k in fp32}}

    monkeypatch.setattr(quantize, "with_intervals", figures)
    check = gate(FP32.copy())
    assert (check.metrics["malignant_pauc"].relative_loss == quantize.MAX_RELATIVE_LOSS) is passed
    assert check.passed is passed
