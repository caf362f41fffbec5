"""The benchmarks run end to end (each is documented as runnable on a fresh clone)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port


@pytest.mark.scenario
def test_bench_serving_runs_and_prints_every_ratio(tiny_run, sample_dir):
    cmd = [sys.executable, "-m", "benchmarks.bench_serving", "--bundle", str(tiny_run / "bundle")]
    cmd += ["--images", str(sample_dir / "images"), "--n-images", "4", "--requests", "8", "--rounds", "2"]
    cmd += ["--clients", "1,8", "--port", str(free_port())]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("HTTP 8 clients / naive script", "p50 at 1 client, batching on / off", "int8 / fp32 CNN"):
        assert line in out.stdout, out.stdout
    assert "draft vs full JPEG decoding, 4 images: top-1 agreement" in out.stdout


@pytest.mark.scenario
def test_bench_training_prints_the_pipeline_and_model_only_speeds(tiny_data):
    cmd = [sys.executable, "-m", "benchmarks.bench_training", "--data-dir", str(tiny_data)]
    cmd += ["--image-size", "32", "--batch-size", "8", "--steps", "2", "--precision", "fp32"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = [line for line in out.stdout.splitlines() if line.startswith("ratio pipeline / model only: ")]
    assert len(ratio) == 1 and float(ratio[0].split(": ")[1]) > 0, out.stdout


@pytest.mark.scenario
def test_compare_tta_prints_the_gain_and_the_cost(tiny_run):
    cmd = [sys.executable, "-m", "benchmarks.compare_tta", "--run", str(tiny_run), "--rounds", "2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TTA - one view" in out.stdout and out.stdout.count("cost ") == 2, out.stdout


@pytest.mark.scenario
def test_bench_scoring_prints_the_ratio_and_the_same_labels(tiny_run, tiny_data):
    cmd = [sys.executable, "-m", "benchmarks.bench_scoring", "--bundle", str(tiny_run / "bundle")]
    cmd += ["--data-dir", str(tiny_data), "--port", str(free_port())]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    n = len(list((tiny_data / "images").iterdir()))
    same = int(last.split("same label for ")[1].split("/")[0])
    assert last.startswith("ratio batch scoring / one by one: ") and f"/{n} images" in last
    assert same >= 0.95 * n, last  # batched and single model calls may differ by float rounding on near-ties


@pytest.mark.scenario
def test_bench_ood_prints_both_methods(tiny_run, sample_dir):
    """Real images the tiny bundle never trained on (the sample's other lesions) against the rest."""
    cmd = [sys.executable, "-m", "benchmarks.bench_ood", "--bundle", str(tiny_run / "bundle")]
    cmd += ["--data-dir", str(sample_dir), "--max-real", "40"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for method in ("mahalanobis", "energy"):
        assert f"{method}: AUROC real vs not real" in out.stdout, out.stdout
    assert out.stdout.count("synthetic lesions") == 3, out.stdout


@pytest.mark.scenario
def test_bench_explain_prints_the_cost_ratio(tiny_run, tiny_data):
    cmd = [sys.executable, "-m", "benchmarks.bench_explain", "--bundle", str(tiny_run / "bundle")]
    cmd += ["--data-dir", str(tiny_data), "--requests", "5"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "explain=true" in out.stdout and "ratio" in out.stdout, out.stdout
