"""Stage 1, folds: lesion-grouped, dx-stratified folds, made once (artifacts/folds.csv) and read
by every later stage."""

from __future__ import annotations

from pathlib import Path

from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.folds]


def run(run: Run) -> None:
    run.table  # noqa: B018 - creates folds.csv
