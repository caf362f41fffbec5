"""Lesion-grouped, dx-stratified folds: computed once per run, saved, read by every later stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from training.data.io import atomic_write_csv
from training.errors import ConfigMismatch


def make_folds(table: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """image_id, lesion_id, fold. No lesion_id ever appears in two folds."""
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = pd.Series(-1, index=table.index)
    for k, (_, val_idx) in enumerate(splitter.split(table, table.dx, groups=table.lesion_id)):
        fold.iloc[val_idx] = k
    return pd.DataFrame({"image_id": table.image_id, "lesion_id": table.lesion_id, "fold": fold.astype(int)})


def ensure_folds(table: pd.DataFrame, path: Path, n_folds: int, seed: int, log=print) -> pd.DataFrame:
    """The rows with their fold, from `path` (RunLayout.folds), written there on first use."""
    if path.exists():
        folds = pd.read_csv(path)
        if set(folds.image_id) != set(table.image_id):
            raise ConfigMismatch(f"{path} was made for different images; use a new --out")
        log(f"folds: reusing {path}")
    else:
        folds = make_folds(table, n_folds, seed)
        atomic_write_csv(path, folds)
        log(f"folds: wrote {path} ({n_folds} folds, {folds.lesion_id.nunique()} lesions)")
    return table.merge(folds[["image_id", "fold"]], on="image_id", how="left", validate="one_to_one")
