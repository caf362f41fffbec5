"""Stage 2, cnn: a ResNet-18 per fold; each image scored by the fold model that never saw its
lesion (artifacts/oof_cnn.csv). With --fold K only that fold (one process or pod per fold)."""

from __future__ import annotations

from pathlib import Path

from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.oof("cnn")]


def run(run: Run) -> None:
    from training.cnn.loop import run_cnn

    run_cnn(run.cfg, run.paths, run.table, run.images, run.log, run.fold)
