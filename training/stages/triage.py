"""Stage 9, triage: operating points on the served answer (training/evaluation/triage.py).

With a calibration share (the default), the points are chosen on the calibration lesions, which the
refit CNNs, boosters and meta-learner never saw, through the very graphs and models the bundle
serves: a point promises what the bundle gives on new images. (Chosen on the fold models' scores
instead, the promise broke on held-out lesions: the refit models score on a wider scale.) With
--calibration-share 0 they are chosen on the served answer's out-of-fold probabilities through the
fold graphs (the baseline stage). Writes artifacts/triage.json, which the report and the bundle read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.triage]


def served_answers(run: Run, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """The bundle's answer for these rows (indices), as the service computes it: each CNN's served
    graph, the refit boosters and meta-learner, the chosen combiner. And what that was, in words."""
    from training.cnn.quantize import run_graph
    from training.ensemble.served import refit_answers
    from training.stages import quantize, select

    cnn_probs, graphs = {}, []
    for name in run.cfg.cnns:
        graph, _ = quantize.served_graph(run, name)
        cnn_probs[name] = run_graph(graph, run.images[rows], run.cfg.image_spec())
        graphs.append(graph.name)
    combiner = select.load(run).combiner.chosen
    what = f"the served {combiner} through {', '.join(graphs)} and the refit level-2 models"
    return refit_answers(run, cnn_probs, rows)[combiner], what


def run(run: Run) -> None:
    from service.core.labels import MALIGNANT_CLASSES
    from training.data.io import PROB_COLUMNS, atomic_write_text
    from training.evaluation.triage import choose_points
    from training.reporting.markdown import fmt
    from training.stages import select

    calibration = run.table.calibration.to_numpy()
    source: Literal["calibration", "out-of-fold"]
    if calibration.any():
        rows = np.flatnonzero(calibration)
        probs, what = served_answers(run, rows)
        source, measured_on = "calibration", f"calibration lesions held out of the served models' refit: {what}"
    else:
        rows = np.arange(len(run.table))
        probs = run.oof("served_graphs")[PROB_COLUMNS].to_numpy()[rows]
        source = "out-of-fold"
        measured_on = "the fold models' graphs, out-of-fold (--calibration-share 0: the served models saw every image)"
    table = run.table.iloc[rows]
    spec = choose_points(
        probs,
        table.dx.isin(MALIGNANT_CLASSES).to_numpy(),
        table.fold.to_numpy(),
        table.lesion_id.to_numpy(),
        select.load(run).lesion_rule.chosen,
        run.cfg.triage,
        run.cfg.triage_default,
        run.cfg.bootstrap,
        run.cfg.seed,
        source,
        measured_on,
    )
    atomic_write_text(run.paths.triage, spec.model_dump_json(indent=2))
    run.log(f"triage: {spec.images} images of {spec.lesions} lesions, {measured_on}")
    for level, points in (("image", spec.points), ("lesion", spec.lesion_points)):
        for p in points:
            figures = ", ".join(f"{k} {fmt(getattr(p, k).model_dump())}" for k in ("sensitivity", "specificity"))
            run.log(f"triage per {level}, {p.name}: threshold {p.threshold:.4f}, {figures}")
