"""Training past one process: one fold per process (`cnn --fold K`, a Kubernetes Indexed Job's pods)
and one fold over several processes (`torchrun`, DistributedDataParallel; gloo on CPUs here)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers import REPO, TINY

pytestmark = pytest.mark.scenario


def cli(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    head = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    out = subprocess.run([*head, "-m", "training", *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_folds_in_separate_processes_make_the_same_run(tiny_run, tiny_data, tmp_path):
    """Each fold as its own process, then `run` for the rest: the same files, and the same
    out-of-fold CNN predictions as the one-process run (same seeds, same machine)."""
    run = tmp_path / "run"
    args = ["--data-dir", str(tiny_data), "--out", str(run), *TINY]
    assert "folds 0, 1 still to train" in cli("cnn", *args, "--fold", "2").stdout  # any order
    cli("cnn", *args, "--fold", "0")
    assert not (run / "artifacts" / "oof_cnn.csv").exists()
    cli("cnn", *args, "--fold", "1")  # the last fold to finish writes the out-of-fold table
    assert (run / "artifacts" / "oof_cnn.csv").exists()
    assert "[cnn] already done" in cli("cnn", *args, "--fold", "2").stdout  # every fold done: the stage is
    cli("run", *args)
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert names(run / "bundle") == names(tiny_run / "bundle")
    for cnn in ("cnn", "cnn_efficientnet_lite0"):  # every CNN of the run
        assert names(run / cnn) == names(tiny_run / cnn)
        oof = f"oof_{cnn}.csv"
        a, b = pd.read_csv(run / "artifacts" / oof), pd.read_csv(tiny_run / "artifacts" / oof)
        pd.testing.assert_frame_equal(a, b, atol=1e-5)
    with pytest.raises(AssertionError, match="this run has folds 0 to 2"):
        cli("cnn", *args, "--fold", "3")


def test_torchrun_trains_one_fold_on_two_processes(tiny_data, tmp_path):
    """2 CPU processes (gloo) against 1 on the same fold: the same out-of-fold rows and columns, weights
    that agree across the processes (checked by the run itself), and metrics within a tolerance:
    the processes augment differently and their batch-norm statistics come from half batches, so the
    runs are not identical; 0.35 in log loss on 14 held-out images after 2 epochs."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--data-dir", str(tiny_data), *TINY, "--epochs", "2", "--arch", "resnet18"]
    cli("cnn", *args, "--out", str(one), "--fold", "0")
    out = cli("cnn", *args, "--out", str(two), "--fold", "0", torchrun=2)
    assert "torchrun: 2 processes train each fold together" in out.stdout
    assert out.stdout.count("fold 0 epoch 2:") == 1  # one process logs
    a, b = pd.read_csv(one / "cnn" / "oof_fold0.csv"), pd.read_csv(two / "cnn" / "oof_fold0.csv")
    assert list(a.columns) == list(b.columns) and (a.row == b.row).all()
    assert np.allclose(b.drop(columns="row").sum(axis=1), 1, atol=1e-6)
    ja = pd.read_json(one / "cnn" / "fold0.json", typ="series")
    jb = pd.read_json(two / "cnn" / "fold0.json", typ="series")
    la, lb = ja["history"][-1]["val_log_loss"], jb["history"][-1]["val_log_loss"]
    assert abs(la - lb) <= 0.35, (la, lb)
    assert sorted(p.name for p in (two / "cnn").iterdir()) == sorted(p.name for p in (one / "cnn").iterdir())
    shutil.rmtree(two)
