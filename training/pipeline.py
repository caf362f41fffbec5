"""The stages of a training run, in order. Each skips itself when its outputs exist in RUN_DIR.

RUN_DIR/
  config.json                  settings (a resumed run must match them)
  artifacts/folds.csv          image_id, lesion_id, fold: read by every later stage
  artifacts/oof_<model>.csv    image_id, fold, p_<class>...: out-of-fold probabilities
  artifacts/report.{json,md}, artifacts/plots/*.png
  cnn/fold<k>.pt               fold models (out-of-fold predictions)
  cnn/refit.pt, cnn/cnn.onnx   the served CNN (refit on all rows, or the fold ensemble) in ONNX
  cnn/cnn.int8.onnx, cnn/quantization.json   the int8 ensemble and its out-of-fold gate
  cnn/ood.json                 the out-of-distribution score's out-of-fold thresholds
  models/<name>.pkl            level-2 models refit on all rows
  bundle/                      what the service loads, and nothing else
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import FP32_GRAPH, INT8_GRAPH, SOFT_VOTE, STACK, RunConfig, save_or_check
from training.data import Dataset, decode_all, load_dataset
from training.errors import ConfigMismatch
from training.folds import ensure_folds, folds_path


class Run:
    """A run directory plus what its stages share, loaded on first use."""

    def __init__(self, cfg: RunConfig, run_dir: Path, log=print, fold: int | None = None) -> None:
        self.cfg, self.dir, self.log = cfg, Path(run_dir), log
        self.fold = fold  # the cnn stage trains only this fold (one process per fold)
        self.artifacts = self.dir / "artifacts"
        self.models = self.dir / "models"

    @cached_property
    def dataset(self) -> Dataset:
        return load_dataset(self.cfg.data_dir, log=self.log)

    @cached_property
    def table(self) -> pd.DataFrame:
        """The dataset's rows with their fold (creating folds.csv on first use)."""
        return ensure_folds(self.dataset.table, self.dir, self.cfg.folds, self.cfg.seed, log=self.log)

    @cached_property
    def images(self) -> np.ndarray:
        return decode_all(list(self.table.path), self.cfg.image_spec())

    def oof(self, model: str) -> pd.DataFrame:
        oof = pd.read_csv(self.artifacts / f"oof_{model}.csv")
        if not (oof.image_id.to_numpy() == self.table.image_id.to_numpy()).all():
            raise ConfigMismatch(f"oof_{model}.csv rows do not match the dataset; use a new --out")
        return oof


def lazy(module: str, function: str) -> Callable[[Run], None]:
    """A stage function imported only when the stage runs (torch is loaded by the stages that need it)."""

    def call(run: Run) -> None:
        getattr(importlib.import_module(module), function)(run)

    return call


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: Callable[[Run], list[Path]]  # all exist <=> the stage is done
    run: Callable[[Run], None]
    needs: tuple[str, ...] = ()  # stages whose outputs it reads (folds are made on demand)


def export_outputs(run: Run) -> list[Path]:
    cnn = run.dir / "cnn"
    refit = [cnn / "refit.pt"] if run.cfg.served_cnn == "refit" else []
    return [*refit, cnn / FP32_GRAPH, cnn / "ood.json"] + (
        [cnn / INT8_GRAPH, cnn / "quantization.json"] if run.cfg.int8 else []
    )


def make_folds_stage(run: Run) -> None:
    run.table  # noqa: B018 - creates folds.csv


STAGES: list[Stage] = [
    Stage("folds", lambda r: [folds_path(r.dir)], make_folds_stage),
    Stage("cnn", lambda r: [r.artifacts / "oof_cnn.csv"], lazy("training.cnn", "cnn_stage")),
    Stage("export", export_outputs, lazy("training.cnn", "export_stage"), needs=("cnn",)),
    Stage(
        "boosters",
        lambda r: [p for m in r.cfg.boosters for p in (r.artifacts / f"oof_{m}.csv", r.models / f"{m}.pkl")],
        lazy("training.boosters", "boosters_stage"),
        needs=("cnn",),
    ),
    Stage(
        "stack",
        lambda r: [r.artifacts / f"oof_{SOFT_VOTE}.csv", r.artifacts / f"oof_{STACK}.csv", r.models / f"{STACK}.pkl"],
        lazy("training.stacking", "stack_stage"),
        needs=("cnn", "boosters"),
    ),
    Stage(
        "report",  # includes the int8 gate when export has run; the out-of-fold figures do not need it
        lambda r: [r.artifacts / "report.json", r.artifacts / "report.md"],
        lazy("training.report", "write_report"),
        needs=("cnn", "boosters", "stack"),
    ),
    Stage(
        "bundle",
        lambda r: [r.dir / "bundle" / "manifest.json"],
        lazy("training.bundle", "write_bundle"),
        needs=("cnn", "export", "boosters", "stack", "report"),
    ),
]
STAGE_NAMES = [s.name for s in STAGES]


def stage_done(run: Run, stage: Stage) -> bool:
    return all(p.exists() for p in stage.outputs(run))


def run_pipeline(cfg: RunConfig, run_dir: Path, stages: list[str], log=print, fold: int | None = None) -> Run:
    """Run the named stages in order, skipping finished ones; the stages they need must be done or named.

    The out-of-fold stages (boosters, stack, report) need the CNN's OOF rows but not its export, so the
    CNN stage can run on a GPU machine and the rest wherever the run directory is copied."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_or_check(cfg, run_dir)
    run = Run(cfg, run_dir, log, fold)
    by_name = {s.name: s for s in STAGES}
    for name in stages:
        missing = [n for n in by_name[name].needs if n not in stages and not stage_done(run, by_name[n])]
        if missing:
            raise ConfigMismatch(f"stage {name} needs {', '.join(missing)} first; run `python -m training run` instead")
    for stage in (s for s in STAGES if s.name in stages):
        if stage_done(run, stage):
            log(f"[{stage.name}] already done in {run_dir}, skipping")
            continue
        log(f"[{stage.name}] running")
        stage.run(run)
    return run
