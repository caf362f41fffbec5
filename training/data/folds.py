"""Lesion-grouped, dx-stratified folds: computed once per run, saved, read by every later stage.

The same file marks the calibration lesions (`--calibration-share`): held out of the served models'
refit, so the triage thresholds can be chosen on what the bundle gives for images it never saw.
Every row keeps its fold: the out-of-fold figures cover calibration rows as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from service.core.labels import MALIGNANT_CLASSES
from training.data.io import atomic_write_csv
from training.errors import ConfigMismatch, DataError


def make_folds(table: pd.DataFrame, n_folds: int, seed: int, calibration_share: float = 0.0) -> pd.DataFrame:
    """image_id, lesion_id, fold, calibration. No lesion_id ever appears in two folds, nor on both
    sides of the calibration split."""
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = pd.Series(-1, index=table.index)
    for k, (_, val_idx) in enumerate(splitter.split(table, table.dx, groups=table.lesion_id)):
        fold.iloc[val_idx] = k
    calibration = calibration_lesion_rows(table, calibration_share, seed)
    check_calibration(table.dx.to_numpy(), fold.to_numpy(), calibration)
    return pd.DataFrame(
        {"image_id": table.image_id, "lesion_id": table.lesion_id, "fold": fold.astype(int), "calibration": calibration}
    )


def check_calibration(dx: np.ndarray, fold: np.ndarray, calibration: np.ndarray) -> None:
    """Each fold's calibration rows are decided by a threshold chosen on the other folds' (nested),
    so the calibration rows outside every fold must hold a malignant image; and the served models
    refit without them must still see every class. Say so at the start of a run, not at its end."""
    if not calibration.any():
        return
    lost = sorted(set(dx) - set(dx[~calibration]))
    if lost:
        raise DataError(
            f"holding out the calibration lesions leaves no {', '.join(lost)} image to refit on: use a smaller "
            "--calibration-share, or 0"
        )
    malignant = np.isin(dx, MALIGNANT_CLASSES) & calibration
    for k in np.unique(fold):
        if not malignant[fold != k].any():
            raise DataError(
                f"the calibration lesions hold {malignant.sum()} malignant images, too few to choose triage "
                "thresholds outside each fold: use a larger --calibration-share, or 0 (thresholds from the fold "
                "models' out-of-fold scores)"
            )


def calibration_lesion_rows(table: pd.DataFrame, share: float, seed: int) -> np.ndarray:
    """The rows of about `share` of the lesions, dx-stratified: one split of round(1 / share)
    lesion-grouped ones (a seed apart from the folds'; 0.3 gives a third). None for a share of 0."""
    if share == 0:
        return np.zeros(len(table), bool)
    splitter = StratifiedGroupKFold(n_splits=max(2, round(1 / share)), shuffle=True, random_state=seed + 1)
    try:
        _, held = next(splitter.split(table, table.dx, groups=table.lesion_id))
    except ValueError as exc:  # fewer lesions than splits
        raise DataError(
            f"cannot hold out {share:g} of {table.lesion_id.nunique()} lesions for calibration: {exc}"
        ) from None
    rows = np.zeros(len(table), bool)
    rows[held] = True
    return rows


def ensure_folds(
    table: pd.DataFrame, path: Path, n_folds: int, seed: int, calibration_share: float = 0.0, log=print
) -> pd.DataFrame:
    """The rows with their fold and calibration mark, from `path` (RunLayout.folds), written there on
    first use."""
    if path.exists():
        folds = pd.read_csv(path)
        if set(folds.image_id) != set(table.image_id):
            raise ConfigMismatch(f"{path} was made for different images; use a new --out")
        if "calibration" not in folds:  # made before the calibration share: every row refit
            if calibration_share > 0:
                raise ConfigMismatch(f"{path} marks no calibration lesions; use a new --out")
            folds["calibration"] = False
        log(f"folds: reusing {path}")
    else:
        folds = make_folds(table, n_folds, seed, calibration_share)
        atomic_write_csv(path, folds)
        held = folds[folds.calibration]
        log(
            f"folds: wrote {path} ({n_folds} folds, {folds.lesion_id.nunique()} lesions; "
            f"{len(held)} images of {held.lesion_id.nunique()} lesions held out of the refit for calibration)"
        )
    columns = folds[["image_id", "fold", "calibration"]].astype({"calibration": bool})
    return table.merge(columns, on="image_id", how="left", validate="one_to_one")
