"""The stages of a training run, in order. Each skips itself when its outputs exist in RUN_DIR.

RUN_DIR/
  config.json                  settings (a resumed run must match them)
  artifacts/folds.csv          image_id, lesion_id, fold: read by every later stage
  artifacts/oof_<model>.csv    image_id, fold, p_<class>...: out-of-fold probabilities
  artifacts/report.{json,md}, artifacts/plots/*.png
  cnn/fold<k>.pt, cnn/cnn.onnx fold models and their exported ensemble
  models/<name>.pkl            level-2 models refit on all rows
  bundle/                      what the service loads, and nothing else
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import ConfigMismatch, RunConfig, save_or_check
from training.data import Dataset, decode_all, load_dataset
from training.folds import ensure_folds

STAGES = ["folds", "cnn", "export", "boosters", "stack", "report", "bundle"]


class Run:
    """A run directory plus what its stages share, loaded on first use."""

    def __init__(self, cfg: RunConfig, run_dir: Path, precision: str = "bf16", log=print) -> None:
        self.cfg, self.dir, self.precision, self.log = cfg, Path(run_dir), precision, log
        self.artifacts = self.dir / "artifacts"

    @cached_property
    def dataset(self) -> Dataset:
        return load_dataset(self.cfg.data_dir, log=self.log)

    @cached_property
    def table(self) -> pd.DataFrame:
        """The dataset's rows with their fold (creating folds.csv on first use)."""
        return ensure_folds(self.dataset.table, self.dir, self.cfg.folds, self.cfg.seed, log=self.log)

    @cached_property
    def images(self) -> np.ndarray:
        from training.cnn import image_spec

        return decode_all(list(self.table.path), image_spec(self.cfg))

    def oof(self, model: str) -> pd.DataFrame:
        oof = pd.read_csv(self.artifacts / f"oof_{model}.csv")
        if not (oof.image_id.to_numpy() == self.table.image_id.to_numpy()).all():
            raise ValueError(f"oof_{model}.csv rows do not match the dataset; use a new --out")
        return oof


def stage_done(run: Run, stage: str) -> bool:
    from training.boosters import BOOSTERS

    a = run.artifacts
    outputs = {
        "folds": [a / "folds.csv"],
        "cnn": [a / "oof_cnn.csv"],
        "export": [run.dir / "cnn" / "cnn.onnx"],
        "boosters": [a / f"oof_{m}.csv" for m in BOOSTERS] + [run.dir / "models" / f"{m}.pkl" for m in BOOSTERS],
        "stack": [a / "oof_soft_vote.csv", a / "oof_stack.csv", run.dir / "models" / "stack.pkl"],
        "report": [a / "report.json", a / "report.md"],
        "bundle": [run.dir / "bundle" / "manifest.json"],
    }[stage]
    return all(p.exists() for p in outputs)


def run_stage(run: Run, stage: str) -> None:
    if stage == "folds":
        run.table  # noqa: B018 - creates folds.csv
    elif stage == "cnn":
        from training.cnn import run_cnn

        run_cnn(run.cfg, run.dir, run.table, run.images, run.precision, run.log)
    elif stage == "export":
        from training.cnn import export_cnn

        export_cnn(run)
    elif stage == "boosters":
        from training.boosters import run_boosters

        run_boosters(run)
    elif stage == "stack":
        from training.stacking import run_stacking

        run_stacking(run)
    elif stage == "report":
        from training.report import write_report

        write_report(run)
    elif stage == "bundle":
        from training.bundle import write_bundle

        write_bundle(run)


def run_pipeline(cfg: RunConfig, run_dir: Path, stages: list[str], precision: str = "bf16", log=print) -> Run:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_or_check(cfg, run_dir)
    run = Run(cfg, run_dir, precision, log)
    first = STAGES.index(stages[0])
    missing = [s for s in STAGES[1:first] if not stage_done(run, s)]  # folds are made on demand
    if missing:
        raise ConfigMismatch(
            f"stage {stages[0]} needs {', '.join(missing)} first; run `python -m training run` instead"
        )
    for stage in stages:
        if stage_done(run, stage):
            log(f"[{stage}] already done in {run_dir}, skipping")
            continue
        log(f"[{stage}] running")
        run_stage(run, stage)
    return run
