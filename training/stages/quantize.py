"""Stage 7, quantize: the accuracy-aware int8 gate on the served answer (training/cnn/quantize.py).

Runs after the stack because the gate measures what the person receives: the int8 CNN's
out-of-fold probabilities through the fold boosters and meta-learner, against the fp32 CNN's.
Writes cnn/cnn.int8.onnx (the passing configuration's graph, or the last one tried) and
cnn/quantization.json (every configuration tried and its figures); the bundle serves int8 only
when one passed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from training.run import Run
from training.stages import select


def outputs(run: Run) -> list[Path]:
    return [run.paths.int8_graph, run.paths.quantization] if run.cfg.int8 else []


def run(run: Run) -> None:
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

    answer = select.load(run).combiner.chosen  # the combiner the bundle serves
    y, fold, lesions = run.table.label.to_numpy(), run.table.fold.to_numpy(), run.table.lesion_id.to_numpy()
    spec, seed, n_boot = run.cfg.image_spec(), run.cfg.seed, run.cfg.bootstrap
    refit = run.cfg.served_cnn == "refit"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        members = [load_fold_model(run.paths, k) for k in range(run.cfg.folds)]
        graphs = FoldGraphs(members, run.images, fold, spec, folder, seed, run.cfg.tta)
        refit_fp32: tuple[np.ndarray, np.ndarray] | None = None

        calibration = run.images[calibration_rows(np.arange(len(y)), seed)]

        def quantize_refit(i: int) -> Path:
            path = folder / f"refit.rung{i}.int8.onnx"
            if not path.exists():
                quantize_member(run.paths.fp32_graph, calibration, spec, path, LADDER[i])
            return path

        def refit_check(rung: Rung, i: int) -> GateCheck:
            """The refit CNN has no out-of-fold images: the same rule on its own (training) images,
            through the refit boosters and meta-learner."""
            nonlocal refit_fp32
            if refit_fp32 is None:
                cnn = run_graph(run.paths.fp32_graph, run.images, spec)
                refit_fp32 = cnn, refit_answers(run, cnn)[answer]
            int8 = run_graph(quantize_refit(i), run.images, spec)
            cnn_pair, answers = (refit_fp32[0], int8), (refit_fp32[1], refit_answers(run, int8)[answer])
            return gate_check(y, lesions, cnn_pair, answers, n_boot, seed)

        def oof_answer(cnn: np.ndarray) -> np.ndarray:
            return oof_answers(run, cnn)[answer]

        attempts, fold_graphs = tune(
            graphs, y, lesions, oof_answer, n_boot, seed, refit_check if refit else None, run.log
        )
        last = len(attempts) - 1  # the passing configuration, or the last one tried: kept for comparison
        if refit:
            atomic_write(run.paths.int8_graph, lambda p: shutil.copyfile(quantize_refit(last), p))
        else:
            joined = join_members(fold_graphs[last])
            atomic_write(run.paths.int8_graph, lambda p: onnx.save(joined, str(p)))
    gate = gate_of(attempts, "refit" if refit else "fold ensemble", answer)
    atomic_write_text(run.paths.quantization, gate.model_dump_json(indent=2))
    verdict = f"passed with {gate.config}" if gate.passed else "failed at every configuration (fp32 served)"
    run.log(f"int8 gate {verdict}")
