"""Stage 7, quantize: the accuracy-aware int8 gate on the served answer, for each CNN
(training/cnn/quantize.py).

Runs after the stack because the gate measures what the person receives: one CNN's int8
out-of-fold probabilities, beside the other CNNs' fp32 ones, through the fold boosters and
meta-learner, against all-fp32. Writes <cnn>/<cnn>.int8.onnx (the passing configuration's graph, or
the last one tried) and <cnn>/quantization.json (every configuration tried and its figures); the
bundle serves a CNN's int8 graph only when it passed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.run import Run
from training.stages import select

if TYPE_CHECKING:
    from service.core.manifest import QuantizationGate


def outputs(run: Run) -> list[Path]:
    if not run.cfg.int8:
        return []
    return [p for name in run.cfg.cnns for p in (run.paths.cnn(name).int8_graph, run.paths.cnn(name).quantization)]


def served_graph(run: Run, name: str) -> tuple[Path, QuantizationGate | None]:
    """The graph the bundle serves for this CNN (its int8 graph when its gate passed, else fp32),
    and the gate (None without --int8)."""
    from service.core.manifest import QuantizationGate

    paths = run.paths.cnn(name)
    gate = QuantizationGate.model_validate_json(paths.quantization.read_text()) if run.cfg.int8 else None
    return (paths.int8_graph if gate is not None and gate.passed else paths.fp32_graph), gate


def run(run: Run) -> None:
    from training.ensemble.boosters import oof_cnn_probs

    answer = select.load(run).combiner.chosen  # the combiner the bundle serves
    oof = oof_cnn_probs(run)
    refit_fp32: dict[str, np.ndarray] = {}  # each refit CNN's fp32 probabilities on the training images

    def refit_probs() -> dict[str, np.ndarray]:
        from training.cnn.quantize import run_graph

        for name in run.cfg.cnns:
            if name not in refit_fp32:
                refit_fp32[name] = run_graph(run.paths.cnn(name).fp32_graph, run.images, run.cfg.image_spec())
        return refit_fp32

    for arch, name in zip(run.cfg.arch, run.cfg.cnns):
        paths = run.paths.cnn(name)
        if paths.int8_graph.exists() and paths.quantization.exists():
            run.log(f"{name}: int8 gate already measured, skipping")
            continue
        oof_with = lambda p, n=name: {**oof, n: p}  # noqa: E731
        refit_with = lambda p, n=name: {**refit_probs(), n: p}  # noqa: E731
        quantize_cnn(run, arch, name, answer, oof_with, refit_with)


def quantize_cnn(
    run: Run,
    arch: str,
    name: str,
    answer: str,
    oof_with: Callable[[np.ndarray], dict[str, np.ndarray]],
    refit_with: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    """One CNN's gate: `oof_with(p)` / `refit_with(p)` are every CNN's probabilities with this one's
    replaced by `p` (the others stay fp32, as the gate measures this CNN's int8 alone)."""
    import shutil

    import onnx

    from service.core.manifest import GateCheck
    from training.cnn.loop import load_fold_model
    from training.cnn.quantize import (
        LADDER,
        FoldGraphs,
        Rung,
        calibration_rows,
        gate_check,
        gate_of,
        join_members,
        quantize_member,
        run_graph,
        tune,
    )
    from training.data.io import atomic_write, atomic_write_text
    from training.ensemble.served import oof_answers, refit_answers

    paths = run.paths.cnn(name)
    y, fold, lesions = run.table.label.to_numpy(), run.table.fold.to_numpy(), run.table.lesion_id.to_numpy()
    spec, seed, n_boot = run.cfg.image_spec(), run.cfg.seed, run.cfg.bootstrap
    refit = run.cfg.served_cnn == "refit"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        members = [load_fold_model(paths, arch, k) for k in range(run.cfg.folds)]
        graphs = FoldGraphs(members, run.images, fold, spec, folder, seed, run.cfg.tta)
        refit_fp32: tuple[np.ndarray, np.ndarray] | None = None

        calibration = run.images[calibration_rows(np.arange(len(y)), seed)]

        def quantize_refit(i: int) -> Path:
            path = folder / f"refit.rung{i}.int8.onnx"
            if not path.exists():
                quantize_member(paths.fp32_graph, calibration, spec, path, LADDER[i])
            return path

        def refit_check(rung: Rung, i: int) -> GateCheck:
            """The refit CNN has no out-of-fold images: the same rule on its own (training) images,
            through the refit boosters and meta-learner."""
            nonlocal refit_fp32
            if refit_fp32 is None:
                cnn = run_graph(paths.fp32_graph, run.images, spec)
                refit_fp32 = cnn, refit_answers(run, refit_with(cnn))[answer]
            int8 = run_graph(quantize_refit(i), run.images, spec)
            cnn_pair, answers = (refit_fp32[0], int8), (refit_fp32[1], refit_answers(run, refit_with(int8))[answer])
            return gate_check(y, lesions, cnn_pair, answers, n_boot, seed)

        def oof_answer(cnn: np.ndarray) -> np.ndarray:
            return oof_answers(run, oof_with(cnn))[answer]

        log = lambda m: run.log(f"{name}: {m}")  # noqa: E731
        attempts, fold_graphs = tune(graphs, y, lesions, oof_answer, n_boot, seed, refit_check if refit else None, log)
        last = len(attempts) - 1  # the passing configuration, or the last one tried: kept for comparison
        if refit:
            atomic_write(paths.int8_graph, lambda p: shutil.copyfile(quantize_refit(last), p))
        else:
            joined = join_members(fold_graphs[last])
            atomic_write(paths.int8_graph, lambda p: onnx.save(joined, str(p)))
    gate = gate_of(attempts, "refit" if refit else "fold ensemble", answer)
    atomic_write_text(paths.quantization, gate.model_dump_json(indent=2))
    verdict = f"passed with {gate.config}" if gate.passed else "failed at every configuration (fp32 served)"
    run.log(f"{name}: int8 gate {verdict}")
