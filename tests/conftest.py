"""Shared fixtures. Tests read the real HAM10000 sample from ../shared/data/ham10000 (never copied).

Two tiers: the fast tier uses the app in-process (TestClient) on a tiny bundle; tests marked
`scenario` start real processes (uvicorn, a browser, a fresh venv, a killed training run).
Every fixture builds what it needs, so any test passes alone and in any order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers import SAMPLE, TINY, make_subset, start_server, train

MAX_UPLOAD = 3_000_000
MAX_PIXELS = 2_000_000


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real sample. Missing on a developer's machine: the tests that need it are skipped; under
    CI (CI=true, which .ci/run sets) they fail, so a broken checkout never passes by skipping."""
    if not (SAMPLE / "HAM10000_metadata.csv").exists():
        message = f"the HAM10000 sample is missing at {SAMPLE}; set HAM_SAMPLE_DIR"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SAMPLE


@pytest.fixture
def subset(sample_dir, tmp_path):
    """subset(per_class, layout="images") -> a small real dataset folder in tmp_path."""

    def make(per_class: int, layout: str = "images", name: str = "d") -> Path:
        return make_subset(sample_dir, tmp_path / name, per_class, layout)

    return make


@pytest.fixture(scope="session")
def tiny_data(sample_dir, tmp_path_factory) -> Path:
    return make_subset(sample_dir, tmp_path_factory.mktemp("tiny") / "data", per_class=6)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A bundle with every booster, trained on a few real lesions per class (plumbing only)."""
    return train(tiny_data, tmp_path_factory.mktemp("tiny-run") / "run", *TINY)


@pytest.fixture(scope="session")
def smoke_run(sample_dir, tmp_path_factory) -> Path:
    """One smoke-preset training run on the whole real sample, fp32: the int8 gate is proven on a
    tiny run of its own (tests/training/test_int8.py), and here it cost a third of the run (3.5 of 10
    minutes: EfficientNet-Lite0 tries every configuration and fails each)."""
    # LESION_TEST_RUN_DIR reuses (resumes) one run across pytest sessions while developing
    run_dir = Path(os.environ.get("LESION_TEST_RUN_DIR") or tmp_path_factory.mktemp("smoke") / "run")
    return train(sample_dir, run_dir, "--preset", "smoke", "--no-int8")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """A tiny bundle trained on the project's synthetic demo data (what `make demo` serves)."""
    from training.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root / "data", n_images=400, seed=0)  # every class in every inner fold
    return train(root / "data", root / "run", *TINY, "--arch", "resnet18")  # plumbing: one CNN is enough


@pytest.fixture(scope="session")
def predictor(tiny_run):
    from service.core.predictor import Predictor

    return Predictor.load(tiny_run / "bundle")


def wait_ready(client, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while client.get("/health/ready").status_code != 200:
        if time.time() > deadline:
            raise AssertionError("the app did not become ready")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def app_factory():
    """app_factory(bundle, **settings) -> a started in-process TestClient, ready; closed at the end."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.settings import Settings

    opened = []

    def make(bundle: Path, **settings) -> TestClient:
        settings = dict(dict(max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS), **settings)
        client = TestClient(create_app(Settings(bundle=bundle, **settings)))
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def api(app_factory, tiny_run):
    """The app in-process on the tiny bundle."""
    return app_factory(tiny_run / "bundle")


@pytest.fixture(scope="session")
def server(smoke_run):
    """A real uvicorn server on the smoke bundle."""
    env = {"LESION_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "LESION_MAX_PIXELS": str(MAX_PIXELS)}
    proc, url = start_server(smoke_run / "bundle", env=env)
    yield url
    proc.terminate()
    proc.wait(10)
