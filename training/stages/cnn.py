"""Stage 2, cnn: each CNN of --arch per fold; each image scored by the fold model that never saw
its lesion (artifacts/oof_<cnn>.csv). With --fold K only that fold (one process or pod per fold)."""

from __future__ import annotations

from pathlib import Path

from training.run import Run


def outputs(run: Run) -> list[Path]:
    return [run.paths.oof(name) for name in run.cfg.cnns]


def run(run: Run) -> None:
    from training.cnn.loop import run_cnn

    for arch in run.cfg.arch:
        run_cnn(run.cfg, arch, run.paths, run.table, run.images, run.log, run.fold)
