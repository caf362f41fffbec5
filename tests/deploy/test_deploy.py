"""What CI can check of the Docker side without a Docker engine."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, start_server

BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin").exists() else Path(sys.executable).parent


def pip_install_target(dockerfile: str) -> str:
    """What a Dockerfile's pip installs, e.g. '.[serve]'."""
    (target,) = re.findall(r'pip install [^\n]*"(\.\[\w+\])"', (REPO / dockerfile).read_text())
    return target


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.train"])
def test_hadolint(dockerfile):
    out = subprocess.run([str(BIN / "hadolint"), dockerfile], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.train"])
def test_base_image_is_pinned_by_digest(dockerfile):
    assert re.search(r"^ARG BASE=python:3\.11-slim@sha256:[0-9a-f]{64}$", (REPO / dockerfile).read_text(), re.M)


def test_compose_files_match_the_compose_spec():
    out = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
        + ["docker-compose.yml", "docker-compose.gpu.yml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfiles_install_the_project_extras():
    assert pip_install_target("Dockerfile.api") == ".[serve]"
    assert pip_install_target("Dockerfile.train") == ".[train]"


def locked_versions(name: str) -> dict[str, str]:
    norm = lambda s: s.lower().replace("_", "-")  # noqa: E731
    return {
        norm(line.split("==")[0]): line.split("==")[1].split(";")[0].strip()
        for line in (REPO / name).read_text().splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.parametrize(
    "lock, extras",
    [("requirements-serve.txt", ["serve"]), ("requirements-train.txt", ["serve", "train"]),
     ("requirements-dev.txt", ["serve", "train", "dev"])],
)  # fmt: skip
def test_each_lock_satisfies_what_pyproject_asks(lock, extras):
    """The serving image's, training's and development's locks hold every requirement of the core
    (ranges) and of their extras (pins) at a version that satisfies it; serving's has no training
    packages."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]
    locked = locked_versions(lock)
    for text in wanted:
        req = Requirement(text.split("#")[0].strip())
        if req.name == "skin-lesion-classifier":
            continue  # the extras' reference to the project itself
        name = req.name.lower().replace("_", "-")
        assert name in locked and req.specifier.contains(locked[name]), f"{lock}: {req} (locked {locked.get(name)})"
    if lock == "requirements-serve.txt":
        assert not {"torch", "torchvision", "kornia", "matplotlib", "plotly", "xgboost"} & set(locked)


@pytest.mark.parametrize("xgboost_arg", ["xgboost", "xgboost-cpu"])
def test_the_gpu_training_image_swaps_in_the_cuda_xgboost(xgboost_arg, tmp_path):
    """xgboost-cpu cannot train on a GPU: the CUDA build of Dockerfile.train (XGBOOST=xgboost, set by
    the GPU compose file) replaces it with the same version of the full xgboost. Runs the Dockerfile's
    own RUN line with stand-ins for pip and python that log what they are asked to do. (The real swap
    was run by hand once: `xgboost.build_info()['USE_CUDA']` was True after it.)"""
    import yaml

    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    assert gpu["services"]["train"]["build"]["args"]["XGBOOST"] == "xgboost"
    train = (REPO / "Dockerfile.train").read_text()
    assert "ARG XGBOOST=xgboost-cpu" in train
    (run,) = [r for r in re.findall(r"^RUN (pip install (?:.*\\\n)*.*)$", train, re.M) if '".[train]"' in r]
    log = tmp_path / "calls.log"
    for tool, extra in (("pip", ""), ("python", "echo 3.2.0\n")):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n{extra}')
        stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "XGBOOST": xgboost_arg, "TORCH_INDEX": "https://index"}
    env |= {"TORCH": "2.14.1", "TORCHVISION": "0.29.1"}
    subprocess.run(["sh", "-ec", run.replace("\\\n", "")], env=env, check=True)  # Docker joins continued lines
    pips = [line for line in log.read_text().splitlines() if line.startswith("pip")]
    swap = ["pip uninstall --yes xgboost-cpu", "pip install --no-cache-dir xgboost==3.2.0"]
    assert pips[0] == "pip install --no-cache-dir --index-url https://index torch==2.14.1 torchvision==0.29.1"
    assert pips[1].startswith("pip install") and pips[1].endswith(".[train]")
    assert pips[2:] == (swap if xgboost_arg == "xgboost" else [])


def test_the_training_image_takes_torch_from_the_cpu_index_at_pyprojects_pins():
    """Only TORCH_INDEX is asked for torch (PyPI's torch is the CUDA build: a 7 GB CPU image)."""
    import tomllib

    train = (REPO / "Dockerfile.train").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in train
    pins = dict(
        d.split("==")
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
        if d.startswith(("torch==", "torchvision=="))
    )
    assert f"ARG TORCH={pins['torch']}" in train and f"ARG TORCHVISION={pins['torchvision']}" in train
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH}" "torchvision==${TORCHVISION}"' in train


def compose_train(tmp_path: Path, data: Path, preset: str | None = None) -> Path:
    """deploy/docker/compose-train.sh with a stand-in `python` that makes the folders training would."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(
        "#!/bin/sh\n"
        'if [ "$3" = demo-data ]; then mkdir -p "$5" && touch "$5/HAM10000_metadata.csv"; exit 0; fi\n'
        'out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done\n'
        'mkdir -p "$out/bundle"; echo trained >> "$out/bundle/log"\n'
    )
    stub.chmod(0o755)
    runs = tmp_path / "runs"
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin", "RUNS_DIR": str(runs), "DATA_DIR": str(data)}
    env |= {"LESION_PRESET": preset} if preset else {}
    subprocess.run(
        ["sh", str(REPO / "deploy" / "docker" / "compose-train.sh")], env=env, check=True, capture_output=True
    )
    return runs


def test_compose_trains_a_run_folder_per_data_and_preset_and_serves_the_latest(tmp_path):
    """The failure it replaces: after a demo `up`, real data in ./data made training refuse
    /runs/current ("started with different settings") and the API never started."""
    data = tmp_path / "data"
    data.mkdir()
    runs = compose_train(tmp_path, data)  # no CSV: the demo
    assert (runs / "current").resolve() == (runs / "demo-smoke").resolve() and (runs / "current" / "bundle").is_dir()
    (data / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    compose_train(tmp_path, data)
    real = (runs / "current").resolve()
    assert real.name.startswith("data-") and real.name.endswith("-cpu")
    compose_train(tmp_path, data, preset="smoke")
    assert (runs / "current").resolve().name == real.name.replace("-cpu", "-smoke")
    assert (runs / "demo-smoke" / "bundle").is_dir() and real.is_dir()  # earlier runs kept: going back resumes them
    (data / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nL1,I1,nv\n")
    compose_train(tmp_path, data)
    assert (runs / "current").resolve() != real  # other data: another run


def test_compose_moves_an_older_current_folder_aside(tmp_path):
    runs = tmp_path / "runs"
    (runs / "current" / "bundle").mkdir(parents=True)
    compose_train(tmp_path, tmp_path / "nodata")
    assert (runs / "current").is_symlink() and [p.name.startswith("previous-") for p in runs.glob("previous-*")] == [
        True
    ]


def test_compose_binds_loopback_and_takes_its_settings_from_the_host():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    api, train = compose["services"]["api"], compose["services"]["train"]
    assert api["ports"] == ["${LESION_API_BIND:-127.0.0.1}:${LESION_API_PORT:-8000}:8000"]
    assert (
        "${LESION_DATA:-./data}:/data:ro" in train["volumes"]
        and train["environment"]["LESION_PRESET"] == "${LESION_PRESET:-}"
    )
    assert train["entrypoint"] == ["sh", "/app/deploy/docker/compose-train.sh"]
    assert "COPY deploy/docker/compose-train.sh deploy/docker/" in (REPO / "Dockerfile.train").read_text()
    documented = set(re.findall(r"^(LESION_\w+)=", (REPO / ".env.example").read_text(), re.M))
    assert documented == set(re.findall(r"\$\{(LESION_\w+):-", (REPO / "docker-compose.yml").read_text()))


@pytest.mark.scenario
def test_train_extra_resolves():
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", ".[train]"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.scenario
def test_api_image_install_serves_a_bundle(smoke_run, tmp_path, sample_dir):
    """A fresh venv with exactly what Dockerfile.api copies and installs (no torch) serves the bundle."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    for line in re.findall(r"^COPY (?!--)([^\n]+) \S+$", (REPO / "Dockerfile.api").read_text(), re.M):
        for item in line.split():
            item = item.rstrip("/")
            if item.startswith("$"):
                continue
            (app_dir / item).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-r", str(REPO / item), str(app_dir / item)], check=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    target = pip_install_target("Dockerfile.api")
    assert "--no-deps -r requirements-serve.txt" in (REPO / "Dockerfile.api").read_text()
    for args in (
        ["-r", "requirements-serve.txt"],
        [target],
    ):  # as the Dockerfile does: the pinned set, then the project
        pip = [str(py), "-m", "pip", "install", "--quiet", "--no-deps", *args]
        subprocess.run(pip, cwd=app_dir, check=True, timeout=900)
    assert "sh deploy/slim_venv.sh /opt/venv" in (REPO / "Dockerfile.api").read_text()
    subprocess.run(["sh", "deploy/slim_venv.sh", str(env_dir)], cwd=app_dir, check=True)  # as the Dockerfile does
    (site,) = env_dir.glob("lib/python3*/site-packages")
    assert not (site / "pandas" / "tests").exists() and not (site / "pip").exists()
    for module in ("torch", "torchvision", "training"):
        assert subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, cwd=tmp_path).returncode != 0, (
            f"{module} must not be in the serving image"
        )
    proc, url = start_server(smoke_run / "bundle", python=py, cwd=app_dir)
    try:
        image = sorted((sample_dir / "images").iterdir())[0]
        r = httpx.post(
            url + "/predict",
            files={"image": image.read_bytes()},
            data={"metadata": '{"age": 50}', "explain": "true"},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["label"] and r.json()["explanation"]["attributions"]
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.scenario
def test_client_package_installs_alone_with_its_command(tmp_path):
    """`pip install ./clients` in a fresh venv: the client and its console command, nothing of the server."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", str(REPO / "clients")], cwd=tmp_path, check=True, timeout=900
    )
    help_ = subprocess.run([str(env_dir / "bin" / "lesion-client"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "score" in help_.stdout
    code = "from lesion_client import AsyncLesionClient, LesionClient, Prediction; print('ok')"
    assert subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout.strip() == "ok"
    for module in ("fastapi", "numpy", "torch", "service", "training"):
        assert subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, cwd=tmp_path).returncode != 0, (
            f"{module} must not come with the client"
        )
