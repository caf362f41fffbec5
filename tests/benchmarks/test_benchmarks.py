"""The benchmarks run end to end (each is documented as runnable on a fresh clone)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from benchmarks.compare_recipes import compare
from service.core.labels import CLASSES
from tests.helpers import REPO, free_port
from training.config import saved_config
from training.run import Run


def bench(module: str, *args: str) -> str:
    """`python -m benchmarks.<module> args...`: it must exit 0; returns what it printed."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("machine: ") and "CPU features: " in out.stdout.splitlines()[0], out.stdout[:300]
    return out.stdout


def test_the_machine_header_names_the_cpu_features_that_change_speed():
    from benchmarks import cpu_flags

    info = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n"
    model, flags = cpu_flags(info)
    assert model == "AMD EPYC 9R14" and {"avx2", "avx512_vnni", "avx512_bf16"} <= flags and "amx_tile" not in flags


@pytest.mark.scenario
def test_bench_serving_runs_and_prints_every_ratio_beside_bentoml(tiny_run, sample_dir, tmp_path_factory):
    """One run of the whole benchmark: every ratio, both load generators at each level, and the peer,
    the same bundle behind BentoML (from a venv of its own), driven by the same load."""
    args = ["--bundle", str(tiny_run / "bundle"), "--images", str(sample_dir / "images"), "--n-images", "4"]
    args += ["--requests", "8", "--rounds", "2", "--clients", "1,8", "--port", str(free_port())]
    args += ["--peer", "bentoml", "--peer-venv", str(tmp_path_factory.getbasetemp() / "bentoml-venv")]
    stdout = bench("bench_serving", *args)
    for line in (
        "HTTP 8 clients / naive script",
        "HTTP 8 clients / in-process batch of 8",
        "p50 at 1 client, batching on / off",
        "HTTP, batching on, driven by python:",
        "HTTP, batching on, driven by hey:",  # .ci/run installs hey
        "HTTP figures driven by hey",
        "BentoML (bentoml==1.4.40, adaptive batching, one worker per service)",
        "int8 vs fp32 needs both graphs",  # the tiny bundle is fp32 only
    ):
        assert line in stdout, stdout
    assert "draft vs full JPEG decoding, 4 images: top-1 agreement" in stdout
    ours = [line for line in stdout.splitlines() if line.strip().startswith(("1 clients:", "8 clients:"))]
    ours = [line for line in ours if "load generator" in line]
    assert len(ours) == 8 and all(" errors 0 " in line for line in ours), stdout
    ratios = [line for line in stdout.splitlines() if "this service / BentoML" in line]
    assert len(ratios) == 2 and all(float(r.split(": ")[1].split("x")[0]) > 0 for r in ratios), stdout


@pytest.mark.scenario
def test_bench_training_prints_the_pipeline_and_model_only_speeds(tiny_data):
    args = ["--data-dir", str(tiny_data), "--image-size", "32", "--batch-size", "8", "--steps", "2"]
    stdout = bench("bench_training", *args, "--precision", "fp32")
    ratio = [line for line in stdout.splitlines() if line.strip().startswith("ratio pipeline / model only: ")]
    assert len(ratio) == 2 and all(float(r.split(": ")[1]) > 0 for r in ratio), stdout  # each CNN
    side = [line for line in stdout.splitlines() if line.startswith("ratio efficientnet_lite0 / resnet18")]
    assert len(side) == 1 and float(side[0].split(": ")[1]) > 0, stdout


@pytest.mark.scenario
def test_compare_tta_prints_the_gain_and_the_cost(tiny_run):
    stdout = bench("compare_tta", "--run", str(tiny_run), "--rounds", "2")
    assert "TTA - one view" in stdout and stdout.count("cost ") == 2, stdout


@pytest.mark.scenario
def test_bench_scoring_prints_the_ratio_and_the_same_labels(tiny_run, tiny_data):
    args = ["--bundle", str(tiny_run / "bundle"), "--data-dir", str(tiny_data), "--port", str(free_port())]
    last = bench("bench_scoring", *args).strip().splitlines()[-1]
    n = len(list((tiny_data / "images").iterdir()))
    same = int(last.split("same label for ")[1].split("/")[0])
    assert last.startswith("ratio batch scoring / one by one: ") and f"/{n} images" in last
    assert same >= 0.95 * n, last  # batched and single model calls may differ by float rounding on near-ties


@pytest.mark.scenario
def test_bench_ood_prints_both_methods(tiny_run, sample_dir):
    """Real images the tiny bundle never trained on (the sample's other lesions) against the rest."""
    args = ["--bundle", str(tiny_run / "bundle"), "--data-dir", str(sample_dir), "--max-real", "40"]
    stdout = bench("bench_ood", *args)
    assert "mahalanobis AUROC" in stdout and "energy AUROC" in stdout, stdout
    rows = {line[:22].strip(): line[22:].split() for line in stdout.splitlines() if "%" in line}
    for kind in (
        "real held-out",
        "photographs",
        "web pages",
        "rendered text",
        "clinical close-ups",
        "all but synthetic",
    ):
        assert kind in rows, stdout
    assert rows["real held-out"][0].endswith("%") and float(rows["rendered text"][0].rstrip("%")) > 50, stdout


@pytest.mark.scenario
def test_bench_explain_prints_the_cost_ratio(tiny_run, tiny_data):
    args = ["--bundle", str(tiny_run / "bundle"), "--data-dir", str(tiny_data), "--requests", "5"]
    stdout = bench("bench_explain", *args)
    assert "explain=true" in stdout and "ratio" in stdout, stdout


def test_compare_recipes_pairs_runs_on_the_same_folds_and_refuses_others(tiny_run, tmp_path):
    """A second "recipe" whose OOF rows lean toward the true class must come out paired and ahead."""
    better = tmp_path / "better"
    lead = saved_config(tiny_run).cnns[0]  # the CNN a recipe comparison compares
    for part in ("config.json", "artifacts/folds.csv", f"artifacts/oof_{lead}.csv", lead):
        dst = better / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (tiny_run / part).is_dir() else shutil.copy)(tiny_run / part, dst)
    config = json.loads((better / "config.json").read_text())
    (better / "config.json").write_text(json.dumps({**config, "lr": config["lr"] / 2}))
    oof = pd.read_csv(better / "artifacts" / f"oof_{lead}.csv")
    onehot = np.eye(len(CLASSES))[Run(saved_config(tiny_run), tiny_run, log=lambda m: None).table.label.to_numpy()]
    probs = oof.filter(like="p_").to_numpy()
    oof[[f"p_{c}" for c in CLASSES]] = 0.5 * probs + 0.5 * onehot
    oof.to_csv(better / "artifacts" / f"oof_{lead}.csv", index=False)

    text = compare([tiny_run, better], bootstrap=20)
    assert f"| lr | {config['lr']} | {config['lr'] / 2} |" in text
    paired = next(line for line in text.splitlines() if line.startswith(f"Paired difference better - {tiny_run.name}"))
    assert float(paired.split("bmca ")[1].split()[0]) > 0, paired
    assert sum(line.startswith("| better |") for line in text.splitlines()) == 2  # metrics row, recall row

    folds = pd.read_csv(better / "artifacts" / "folds.csv")
    folds.assign(fold=(folds.fold + 1) % folds.fold.nunique()).to_csv(better / "artifacts" / "folds.csv", index=False)
    with pytest.raises(SystemExit, match="do not share their folds"):
        compare([tiny_run, better], bootstrap=5)
