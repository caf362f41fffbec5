"""Atomic writes, and the out-of-fold table layout every stage writes and reads.

Every stage output appears whole or not at all, so a killed run resumes cleanly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from service.core import labels

PROB_COLUMNS = [f"p_{c}" for c in labels.CLASSES]
"""An OOF table: image_id, fold, then one probability column per class."""


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    """Floats written to round-trip exactly: the stack reads the boosters' tables, and the int8 gate's
    recomputed pipeline must give what the report scored (a standardised near-constant column of the
    meta-learner's input turns a rounding of 1e-8 into a change of 1e-2)."""
    atomic_write(path, lambda p: df.to_csv(p, index=False, float_format="%.17g"))


def write_oof(path: Path, table: pd.DataFrame, probs: np.ndarray) -> None:
    """artifacts/oof_<model>.csv: the run table's image_id and fold beside each row's probabilities."""
    ids = table[["image_id", "fold"]].reset_index(drop=True)
    atomic_write_csv(path, pd.concat([ids, pd.DataFrame(probs, columns=PROB_COLUMNS)], axis=1))
