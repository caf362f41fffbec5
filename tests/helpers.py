"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("HAM_SAMPLE_DIR", REPO.parent / "shared" / "data" / "ham10000"))
ARTIFACTS = REPO / "test-artifacts"
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


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


def sample_images(sample_dir: Path, n: int = 4) -> list[Path]:
    return sorted((sample_dir / "images").iterdir())[::500][:n]


def png(width: int, height: int, noise: bool = False) -> bytes:
    arr = (
        np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        if noise
        else np.zeros((height, width, 3), np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(
    bundle: Path, python=sys.executable, cwd=REPO, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m service` on a free loopback port; returns once /health/ready answers 200.

    The server's output goes to a file (`proc.log_path`), never to a pipe nobody reads: a full pipe
    would block the server on its next log line."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(python), "-m", "service", "--bundle", str(bundle), "--port", str(port)],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log.close()
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(Path(log.name).read_text())
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def metric_total(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in a /metrics text: a value, not a line count."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def wait_for_metric(url: str, name: str, value: float, headers: dict | None = None, timeout: float = 30) -> None:
    """Poll /metrics until `name` totals `value`: the server says it got there, whatever the machine's
    speed (bounded by `timeout`)."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        seen = metric_total(httpx.get(url + "/metrics", headers=headers, timeout=10).text, name)
        if seen == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} stayed {seen}, never {value}, for {timeout} s")


def train(data_dir: Path, out: Path, *extra: str) -> Path:
    """`python -m training run` in its own process, as a user runs it; returns the run directory.

    (In the test process, libraries loaded by earlier tests would share the cores with torch.)"""
    cmd = [sys.executable, "-m", "training", "run", "--data-dir", str(data_dir), "--out", str(out)]
    out_ = subprocess.run(cmd + list(extra), cwd=REPO, capture_output=True, text=True, timeout=1200)
    if out_.returncode != 0:
        raise AssertionError(f"training exited with {out_.returncode}:\n{out_.stdout[-3000:]}\n{out_.stderr[-3000:]}")
    return out


TINY = ["--preset", "smoke", "--folds", "3", "--epochs", "1", "--image-size", "32", "--bootstrap", "5", "--no-int8"]
"""Settings for bundles that only prove plumbing: about 30 s on 2 cores (fp32: the int8 tests add --int8)."""


# Python code that makes the named packages behave as if not installed (run with `python -c`).
BLOCK = """import sys
class Absent:  # these packages behave as if they were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
"""


def variants(path, n: int) -> list[bytes]:
    """n different files of one image: a 4x4 corner patch of a different shade in each (other pixels
    at the model's input, much the same answer)."""
    from PIL import Image

    base = np.asarray(Image.open(path).convert("RGB")).copy()
    out = []
    for i in range(n):
        base[:4, :4] = 6 * i
        buf = io.BytesIO()
        Image.fromarray(base).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def first_error(data: dict) -> str:
    """The first error's location and message, as read_manifest reports it; '' when the manifest is valid."""
    from pydantic import ValidationError

    from service.core.manifest import Manifest

    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        return ".".join(str(p) for p in e["loc"]) + ": " + e["msg"]
    return ""


def with_malignant_sum(scores: np.ndarray) -> np.ndarray:
    """Class probabilities whose malignant sum is `scores` (all on mel, the rest on nv)."""
    probs = np.zeros((len(scores), len(CLASSES)))
    probs[:, CLASSES.index("mel")], probs[:, CLASSES.index("nv")] = scores, 1 - scores
    return probs
