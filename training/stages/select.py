"""Stage 6, select: the combiner the bundle serves and the rule that combines a lesion's images,
each chosen by the rule fixed in advance (training/ensemble/selection.py) on out-of-fold rows,
nested in the outer folds. `--served NAME` overrides the combiner; the rule's pick is still recorded.

Its output is named by the request (artifacts/selection-auto.json, selection-stack.json, ...), so
asking a finished run for another combiner reruns this stage and the stages that read it, and
nothing before them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.io import PROB_COLUMNS, atomic_write_text
from training.ensemble.selection import Outcome, Selection, select
from training.errors import ConfigMismatch
from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.selection(run.cfg.served)]


def load(run: Run) -> Selection:
    return Selection.model_validate_json(run.paths.selection(run.cfg.served).read_text())


def outcome(run: Run, probs: dict[str, np.ndarray]) -> Outcome:
    """The selection from every model's out-of-fold probabilities (deterministic: the report
    recomputes it for the nested predictions, and checks it against the saved one)."""
    requested = None if run.cfg.served == "auto" else run.cfg.served
    t = run.table
    return select(
        t.label.to_numpy(), t.fold.to_numpy(), t.lesion_id.to_numpy(), probs, run.cfg.serving_candidates, requested
    )


def saved_outcome(run: Run, probs: dict[str, np.ndarray]) -> Outcome:
    out = outcome(run, probs)
    if out.selection != load(run):
        raise ConfigMismatch(
            f"{run.paths.selection(run.cfg.served)} is older than the out-of-fold tables; rerun select"
        )
    return out


def run(run: Run) -> None:
    probs = {m: run.oof(m)[PROB_COLUMNS].to_numpy() for m in run.cfg.components}
    selection = outcome(run, probs).selection
    atomic_write_text(run.paths.selection(run.cfg.served), selection.model_dump_json(indent=2))
    c, rule = selection.combiner, selection.lesion_rule
    how = f"as requested (the rule picks {c.picked})" if c.requested else f"by the rule ({c.rule})"
    run.log(
        f"select: serving {c.chosen}, {how}; picked without each outer fold: {', '.join(c.fold_picks)}. "
        f"A lesion's images combine by {rule.chosen} (picked without each fold: {', '.join(rule.fold_picks)})"
    )
