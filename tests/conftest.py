"""Shared fixtures. Tests read the real HAM10000 sample from ../shared/data/ham10000 (never copied)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("HAM_SAMPLE_DIR", REPO.parent / "shared" / "data" / "ham10000"))
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "HAM10000_metadata.csv").exists():
        pytest.fail(f"the HAM10000 sample is missing at {SAMPLE}; set HAM_SAMPLE_DIR")
    return SAMPLE


def make_subset(sample_dir: Path, out: Path, per_class: int, layout: str = "images") -> Path:
    """A small real dataset: whole lesions, a few per class, in a HAM10000 layout."""
    present = pd.read_csv(sample_dir / "images_present.csv")
    lesions = present.drop_duplicates("lesion_id").groupby("dx").head(per_class).lesion_id
    rows = present[present.lesion_id.isin(lesions)]
    folder = out / layout
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in rows.image_id:
        shutil.copy(sample_dir / "images" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    rows.to_csv(out / "HAM10000_metadata.csv", index=False)
    return out


@pytest.fixture(scope="session")
def smoke_run(sample_dir, tmp_path_factory) -> Path:
    """One smoke-preset training run on the whole real sample, shared by many tests."""
    from training.__main__ import main

    # LESION_TEST_RUN_DIR reuses (resumes) one run across pytest sessions while developing
    run_dir = Path(os.environ.get("LESION_TEST_RUN_DIR") or tmp_path_factory.mktemp("smoke") / "run")
    assert (
        main(["run", "--data-dir", str(sample_dir), "--out", str(run_dir), "--preset", "smoke", "--workers", "0"]) == 0
    )
    return run_dir
