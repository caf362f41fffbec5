"""What CI can check of the Docker side without a Docker engine."""

from __future__ import annotations

import re
import subprocess
import sys
import venv

import httpx
import pytest

from tests.conftest import REPO
from tests.test_service import start_server

BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin").exists() else __import__("pathlib").Path(sys.executable).parent


def installed_requirements(dockerfile: str) -> list[str]:
    return re.findall(r"pip install [^\n]*-r (\S+)", (REPO / dockerfile).read_text())


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.train"])
def test_hadolint(dockerfile):
    out = subprocess.run([str(BIN / "hadolint"), dockerfile], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_files_match_the_compose_spec():
    out = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
            "docker-compose.gpu.yml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_train_requirements_resolve():
    assert installed_requirements("Dockerfile.train") == ["requirements-train.txt"]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "-r", "requirements-train.txt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr


def test_api_image_requirements_serve_a_bundle(smoke_run, tmp_path, sample_dir):
    """A fresh venv from exactly what Dockerfile.api installs (no torch) serves the bundle."""
    assert installed_requirements("Dockerfile.api") == ["requirements-serve.txt"]
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "-r", str(REPO / "requirements-serve.txt")],
        check=True,
        timeout=900,
    )
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0, (
        "torch must not be installed"
    )
    app_dir = tmp_path / "app"  # only what the Dockerfile copies
    app_dir.mkdir()
    for folder in re.findall(r"^COPY (\w+)/ \1/$", (REPO / "Dockerfile.api").read_text(), re.M):
        subprocess.run(["cp", "-r", str(REPO / folder), str(app_dir / folder)], check=True)
    proc, url = start_server(smoke_run / "bundle", python=py, cwd=app_dir)
    try:
        image = sorted((sample_dir / "images").iterdir())[0]
        r = httpx.post(
            url + "/predict", files={"image": image.read_bytes()}, data={"metadata": '{"age": 50}'}, timeout=30
        )
        assert r.status_code == 200 and r.json()["label"]
    finally:
        proc.terminate()
        proc.wait(10)
