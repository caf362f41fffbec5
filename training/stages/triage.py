"""Stage 9, triage: operating points on the served answer (training/evaluation/triage.py).

Reads the served answer's out-of-fold probabilities through the graphs the bundle serves (the
baseline stage), so each point's promised sensitivity, specificity and referral share are measured
on what the service computes; writes artifacts/triage.json, which the report and the bundle read.
"""

from __future__ import annotations

from pathlib import Path

from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.triage]


def run(run: Run) -> None:
    from service.core.labels import MALIGNANT_CLASSES
    from training.data.io import PROB_COLUMNS, atomic_write_text
    from training.evaluation.triage import choose_points
    from training.stages import select

    probs = run.oof("served_graphs")[PROB_COLUMNS].to_numpy()
    malignant = run.table.dx.isin(MALIGNANT_CLASSES).to_numpy()
    spec = choose_points(
        probs,
        malignant,
        run.table.fold.to_numpy(),
        run.table.lesion_id.to_numpy(),
        select.load(run).lesion_rule.chosen,
        run.cfg.triage,
        run.cfg.triage_default,
        run.cfg.bootstrap,
        run.cfg.seed,
    )
    atomic_write_text(run.paths.triage, spec.model_dump_json(indent=2))
    for level, points in (("image", spec.points), ("lesion", spec.lesion_points)):
        for p in points:
            run.log(
                f"triage per {level}, {p.name}: threshold {p.threshold:.4f}, out-of-fold sensitivity {p.sensitivity.value:.3f} "
                f"[{p.sensitivity.ci95[0]:.3f}, {p.sensitivity.ci95[1]:.3f}], specificity {p.specificity.value:.3f}, referred {p.referral_share.value:.3f}"
            )
