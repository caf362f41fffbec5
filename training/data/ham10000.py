"""Read HAM10000 as it is distributed: the metadata CSV plus one or more folders of ISIC_*.jpg."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from service.core import labels
from service.core.metadata import ClinicalMetadata
from service.core.preprocess import ImageError, ImageSpec, load_for_model
from training.data.synthetic import SYNTHETIC_DX_TYPE
from training.errors import DataError

REQUIRED_COLUMNS = ["lesion_id", "image_id", "dx", "age", "sex", "localization"]
METADATA_NAME = "HAM10000_metadata.csv"
IMAGE_RE = re.compile(r"^(isic_\d+)\.(jpe?g|png)$", re.IGNORECASE)


@dataclass
class Dataset:
    table: pd.DataFrame  # one row per image that exists: image_id, lesion_id, dx, age, sex, localization, path, label
    skipped: int  # metadata rows whose image file is missing
    synthetic: bool = False  # some rows are the project's synthetic demo data (dx_type "synthetic")

    def metadata(self) -> list[ClinicalMetadata]:
        return [
            ClinicalMetadata(age=None if math.isnan(a) else float(a), sex=s, site=site)
            for a, s, site in zip(self.table.age, self.table.sex, self.table.localization)
        ]


def find_metadata_csv(data_dir: Path) -> Path:
    candidates = [p for p in data_dir.rglob("*.csv") if p.name.lower() == METADATA_NAME.lower()]
    if not candidates:
        raise DataError(f"{data_dir}: no {METADATA_NAME} found (looked in the folder and its subfolders)")
    return sorted(candidates, key=lambda p: len(p.parts))[0]


def find_images(data_dir: Path) -> dict[str, Path]:
    """image_id (as in the CSV, e.g. ISIC_0024306) -> path, from every subfolder, names case-insensitive.

    An id found in two files that are copies (Kaggle's download ships each image folder twice) is
    read from the first; two different files under one id are refused rather than guessed: a
    folder of masks or of annotated copies beside the images would otherwise be trained on."""
    found: dict[str, Path] = {}
    clashes: dict[str, list[Path]] = {}
    for p in sorted(data_dir.rglob("*")):
        m = IMAGE_RE.match(p.name)
        if not (m and p.is_file()):
            continue
        key = m.group(1).upper()
        if key not in found:
            found[key] = p
        elif not same_file_content(found[key], p):
            clashes.setdefault(key, [found[key]]).append(p)
    if clashes:
        folders = sorted({str(q.parent.relative_to(data_dir)) for paths in clashes.values() for q in paths})
        first = next(iter(clashes))
        raise DataError(
            f"{data_dir}: {len(clashes)} image ids (e.g. {first}) are in more than one file, and the files "
            f"differ, in the folders {', '.join(folders)}: keep only the dermoscopy images under the data "
            "folder (the metadata CSV and its image folders)"
        )
    return found


def same_file_content(a: Path, b: Path, head: int = 64 * 1024) -> bool:
    """Copies of one image: the same size and the same first 64 KiB."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read(head) == fb.read(head)


def read_metadata(csv_path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: malformed CSV: {str(exc).strip()}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: the file is empty") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED_COLUMNS)})")

    def bad(i: int, msg: str) -> DataError:
        return DataError(f"{csv_path} row {i + 2}: {msg}")  # +2: header line, 1-based

    ages = np.full(len(df), np.nan)
    for i, row in enumerate(df.itertuples(index=False)):
        if not row.image_id or not row.lesion_id:
            raise bad(i, "empty image_id or lesion_id")
        if row.dx not in labels.CLASSES:
            raise bad(i, f"unknown dx {row.dx!r}; expected one of {', '.join(labels.CLASSES)}")
        if row.sex not in labels.SEXES:
            raise bad(i, f"unknown sex {row.sex!r}; expected one of {', '.join(labels.SEXES)}")
        if row.localization not in labels.SITES:
            raise bad(i, f"unknown localization {row.localization!r}; expected one of {', '.join(labels.SITES)}")
        if row.age.strip():
            try:
                ages[i] = float(row.age)
            except ValueError:
                raise bad(i, f"age {row.age!r} is not a number") from None
            lo, hi = labels.AGE_RANGE
            if not lo <= ages[i] <= hi:
                raise bad(i, f"age {ages[i]} outside {lo:g}-{hi:g}")
    df = df.assign(age=ages, image_id=df.image_id.str.upper())
    dup = df.image_id[df.image_id.duplicated()]
    if len(dup):
        raise DataError(f"{csv_path}: image_id {dup.iloc[0]} appears more than once")
    return df


def load_dataset(data_dir: str | Path, log=print) -> Dataset:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory does not exist")
    csv_path = find_metadata_csv(data_dir)
    df = read_metadata(csv_path)
    images = find_images(data_dir)
    df["path"] = df.image_id.map(images)
    skipped = int(df.path.isna().sum())
    df = df[df.path.notna()].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{data_dir}: none of the {skipped} images listed in {csv_path.name} were found")
    df["label"] = df.dx.map(labels.CLASSES.index).astype(int)
    if skipped:
        log(f"{csv_path.name}: {len(df)} images found, {skipped} listed rows skipped because their image is missing")
    n_synthetic = int((df.dx_type == SYNTHETIC_DX_TYPE).sum()) if "dx_type" in df.columns else 0
    synthetic = n_synthetic > 0  # any: a bundle that saw demo images is a demo
    if synthetic:
        log(f"{csv_path.name}: {n_synthetic} of {len(df)} images are synthetic demo data (dx_type={SYNTHETIC_DX_TYPE})")
    return Dataset(
        table=df[["image_id", "lesion_id", "dx", "label", "age", "sex", "localization", "path"]],
        skipped=skipped,
        synthetic=synthetic,
    )


def decode_all(paths: list[Path], spec: ImageSpec, desc: str = "decoding images") -> np.ndarray:
    """Decode and resize every image once: (N,H,W,3) uint8. Unreadable images name their file."""
    out = np.empty((len(paths), spec.height, spec.width, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False, disable=None)):
        try:
            out[i] = load_for_model(Path(p).read_bytes(), spec)
        except ImageError as exc:
            raise DataError(f"{p}: unreadable image: {exc}") from None
    return out
