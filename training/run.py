"""A run: its settings, its folder's layout and what its stages share, loaded on first use."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import RunConfig
from training.data.folds import ensure_folds
from training.data.ham10000 import Dataset, decode_all, load_dataset
from training.errors import ConfigMismatch
from training.layout import RunLayout


class Run:
    """A run directory plus what its stages share, loaded on first use."""

    def __init__(self, cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print, fold: int | None = None):
        self.cfg, self.dir, self.log = cfg, Path(run_dir), log
        self.fold = fold  # the cnn stage trains only this fold (one process per fold)
        self.paths = RunLayout(self.dir)

    @cached_property
    def dataset(self) -> Dataset:
        return load_dataset(self.cfg.data_dir, log=self.log)

    @cached_property
    def table(self) -> pd.DataFrame:
        """The dataset's rows with their fold and calibration mark (creating folds.csv on first use)."""
        return ensure_folds(
            self.dataset.table,
            self.paths.folds,
            self.cfg.folds,
            self.cfg.seed,
            self.cfg.calibration_share,
            log=self.log,
        )

    @property
    def refit_rows(self) -> np.ndarray:
        """The rows the served models are refit on: all but the calibration lesions."""
        return ~self.table.calibration.to_numpy()

    @cached_property
    def images(self) -> np.ndarray:
        return decode_all(list(self.table.path), self.cfg.image_spec())

    def oof(self, model: str) -> pd.DataFrame:
        oof = pd.read_csv(self.paths.oof(model))
        if not (oof.image_id.to_numpy() == self.table.image_id.to_numpy()).all():
            raise ConfigMismatch(f"oof_{model}.csv rows do not match the dataset; use a new --out")
        return oof
