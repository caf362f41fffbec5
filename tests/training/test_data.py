"""Loading HAM10000 as distributed, and every bad input's clear error."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from service.core.preprocess import ImageSpec
from training.__main__ import main
from training.data.ham10000 import DataError, decode_all, load_dataset


def test_sample_skips_and_counts_missing_images(sample_dir):
    messages = []
    ds = load_dataset(sample_dir, log=messages.append)
    present, listed = pd.read_csv(sample_dir / "images_present.csv"), pd.read_csv(sample_dir / "HAM10000_metadata.csv")
    assert len(ds.table) == len(present) and ds.skipped == len(listed) - len(present)
    assert f"{len(listed) - len(present)} listed rows skipped" in messages[0]
    assert ds.table.age.isna().sum() == pd.read_csv(sample_dir / "images_present.csv").age.isna().sum()


def test_age_zero_is_a_value_and_empty_is_missing(tmp_path, subset):
    d = subset(1)
    meta = pd.read_csv(d / "HAM10000_metadata.csv", dtype=str)
    meta.loc[0, "age"], meta.loc[1, "age"] = "0", ""
    meta.to_csv(d / "HAM10000_metadata.csv", index=False)
    ds = load_dataset(d, log=lambda m: None)
    assert ds.table.age.iloc[0] == 0.0 and np.isnan(ds.table.age.iloc[1])
    assert ds.metadata()[0].age == 0.0 and ds.metadata()[1].age is None


def test_kaggle_layout_two_parts_case_insensitive(tmp_path, subset):
    d = subset(2, layout="HAM10000_images_part_1")
    part2 = d / "ham10000_images_part_2"
    part2.mkdir()
    files = sorted((d / "HAM10000_images_part_1").iterdir())
    for f in files[: len(files) // 2]:
        shutil.move(f, part2 / f.name.lower())  # isic_0024306.jpg
    ds = load_dataset(d, log=lambda m: None)
    assert len(ds.table) == len(files) and ds.skipped == 0


def test_an_image_id_in_two_folders_is_refused_not_guessed(subset):
    """A mirror whose data folder also holds masks or annotated copies under the same ids."""
    d = subset(2, layout="images")
    boxes = d / "boxes"
    boxes.mkdir()
    for f in sorted((d / "images").iterdir()):
        Image.new("L", (200, 150)).save(boxes / f"{f.stem}.png")  # sorts before images/
    with pytest.raises(DataError, match=r"more than one file, and the files differ, in the folders boxes, images"):
        load_dataset(d, log=lambda m: None)


def test_copies_of_an_image_folder_are_read_once(subset):
    """Kaggle's HAM10000 download holds each image folder twice (HAM10000_images_part_1 and
    ham10000_images_part_1): copies are fine, each image counted once."""
    d = subset(2, layout="HAM10000_images_part_1")
    shutil.copytree(d / "HAM10000_images_part_1", d / "ham10000_images_part_1")
    ds = load_dataset(d, log=lambda m: None)
    assert len(ds.table) == len(list((d / "HAM10000_images_part_1").iterdir())) and ds.skipped == 0


def write_csv(d, mutate):
    meta = pd.read_csv(d / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    meta = mutate(meta)
    meta.to_csv(d / "HAM10000_metadata.csv", index=False)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.drop(columns=["dx"]), "missing column(s) dx"),
        (lambda m: m.assign(dx=["xyz"] + list(m.dx[1:])), "row 2: unknown dx 'xyz'"),
        (lambda m: m.assign(sex=list(m.sex[:2]) + ["other"] + list(m.sex[3:])), "row 4: unknown sex 'other'"),
        (lambda m: m.assign(localization=["elbow"] + list(m.localization[1:])), "row 2: unknown localization 'elbow'"),
        (lambda m: m.assign(age=["old"] + list(m.age[1:])), "row 2: age 'old' is not a number"),
    ],
)
def test_bad_metadata_names_file_and_row(tmp_path, subset, mutate, message):
    d = subset(1)
    write_csv(d, mutate)
    with pytest.raises(DataError) as err:
        load_dataset(d, log=lambda m: None)
    assert "HAM10000_metadata.csv" in str(err.value) and message in str(err.value)


def test_malformed_csv(tmp_path, subset):
    d = subset(1)
    with open(d / "HAM10000_metadata.csv", "a") as f:
        f.write("HAM_1,ISIC_1,nv,histo,40,male,back,extra,fields\n")
    with pytest.raises(DataError, match="malformed CSV"):
        load_dataset(d, log=lambda m: None)


def test_unreadable_image_names_the_file(tmp_path, subset):
    d = subset(1)
    victim = sorted((d / "images").iterdir())[0]
    victim.write_bytes(b"this is not a jpeg")
    ds = load_dataset(d, log=lambda m: None)
    with pytest.raises(DataError, match=victim.name):
        decode_all(list(ds.table.path), ImageSpec(width=32, height=24))


def test_cli_prints_error_not_traceback(tmp_path, subset, capsys):
    d = subset(1)
    write_csv(d, lambda m: m.drop(columns=["lesion_id"]))
    assert main(["folds", "--data-dir", str(d), "--out", str(tmp_path / "run"), "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lesion_id" in err and "Traceback" not in err
    assert main(["run", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_synthetic_dataset_is_deterministic_and_loadable(tmp_path):
    from training.data.synthetic import write_demo_dataset

    a = write_demo_dataset(tmp_path / "a", n_images=40, seed=3)
    b = write_demo_dataset(tmp_path / "b", n_images=40, seed=3)
    pd.testing.assert_frame_equal(a, b)
    img = "HAM10000_images_part_1/" + a.image_id[0] + ".jpg"
    assert (tmp_path / "a" / img).read_bytes() == (tmp_path / "b" / img).read_bytes()
    ds = load_dataset(tmp_path / "a", log=lambda m: None)
    assert len(ds.table) == 40 and ds.skipped == 0
    assert a.groupby("lesion_id").dx.nunique().max() == 1  # a lesion has one diagnosis


def test_stage_out_of_order_is_a_clear_error(tmp_path, subset, capsys):
    d = subset(1)
    assert main(["boosters", "--data-dir", str(d), "--out", str(tmp_path / "run"), "--preset", "smoke"]) == 2
    assert "stage boosters needs cnn first" in capsys.readouterr().err
