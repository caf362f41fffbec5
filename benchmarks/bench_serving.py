"""Serving speed of a bundle against the script people would write instead, side by side in one run.

python -m benchmarks.bench_serving --bundle runs/x/bundle [--images DIR] [--requests 200]
(a fresh clone: `make train-demo`, then --bundle runs/demo/bundle --images demo-data/HAM10000_images_part_1)

Measured in this order, on the same machine, in one run:
1. the naive per-request script: torch eager ResNet-18 (one model, not an ensemble), torchvision
   transforms, PIL decoding, one image at a time on every core, at the bundle's input size;
2. the in-process Predictor (decode + the whole stack) for one request, int8 and fp32 CNN graphs at
   batch 1 and 8 when the bundle carries both;
3. the service over HTTP (uvicorn subprocess, one worker) at 1, 8 and 32 concurrent clients, with
   micro-batching off (LESION_BATCH_MAX_SIZE=1) and on (the default settings), driven by the Python
   client (httpx threads) and by `hey` (a native load generator, when installed).
Requests are real HAM10000 images, upscaled to the originals' 600x450 and JPEG-encoded. The load
generator runs on the same machine as the server and shares its cores: each level prints the cores
the generator itself used, so its cost is visible rather than hidden in the server's figure.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks import machine_header
from benchmarks.bench_inference import graph_images_per_s, timed
from service.core.metadata import ClinicalMetadata
from service.core.predictor import Predictor, limit_numpy_blas
from service.core.preprocess import decode_opened, load_for_model, open_image, resize_for_model, to_model_input

DEFAULT_IMAGES = Path(__file__).parents[1].parent / "shared" / "data" / "ham10000" / "images"
META = '{"age": 55, "sex": "female", "site": "back"}'


def jpeg_requests(folder: Path, n: int, size: tuple[int, int]) -> list[bytes]:
    paths = sorted(folder.glob("*.jpg"))[:n]
    if not paths:
        sys.exit(f"no .jpg images in {folder}; pass --images")
    out = []
    for p in paths:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_second(fn, items: list, rounds: int) -> float:
    """Calls/s of fn over the items in turn."""
    cycle = itertools.cycle(items)
    return 1 / timed(lambda: fn(next(cycle)), rounds)


def naive_script(images: list[bytes], width: int, height: int, rounds: int) -> float:
    """Images/s of the per-request torch script (random weights: speed does not depend on them)."""
    import torch
    from torchvision import transforms
    from torchvision.models import resnet18

    torch.set_num_threads(os.cpu_count() or 1)
    model = resnet18(num_classes=7).eval()
    tf = transforms.Compose(
        [
            transforms.Resize((height, width)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    def predict(data: bytes) -> np.ndarray:
        x = tf(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            return model(x).softmax(1).numpy()

    return per_second(predict, images, rounds)


def cnn_graphs(bundle: Path, m) -> dict[str, Path]:
    """precision -> graph: the bundle's, and the run's other graph when the bundle sits in its run
    directory (RUN_DIR/bundle beside RUN_DIR/cnn): an int8 graph its gate kept out, or the fp32 one."""
    graphs = {m.cnn.precision: bundle / m.cnn.file}
    if m.cnn.fp32_file:
        graphs["fp32"] = bundle / m.cnn.fp32_file
    for precision, name in (("int8", "cnn.int8.onnx"), ("fp32", "cnn.onnx")):
        if precision not in graphs and (bundle.parent / "cnn" / name).exists():
            graphs[precision] = bundle.parent / "cnn" / name
    return graphs


def wait_ready(proc: subprocess.Popen, url: str, what: str, timeout_s: float) -> subprocess.Popen:
    """`proc` once `url` answers 200; the benchmark exits if it dies or is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"{what} did not start")
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{what} was not ready after {timeout_s:.0f} s")


def start_service(bundle: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service", "--bundle", str(bundle), "--port", str(port)]
    proc = subprocess.Popen(cmd, env={**os.environ, "LESION_LOG_LEVEL": "warning", **env})
    return wait_ready(proc, f"http://127.0.0.1:{port}/health/ready", "the service", 120)


@dataclass
class Load:
    """What one load generator measured at one concurrency level."""

    rps: float
    latencies: list[float]  # seconds, answered requests only
    errors: int  # non-200 answers and failed connections
    client_cpu: float  # cores the load generator itself used (CPU seconds / wall seconds)


def multipart(url: str, image: bytes) -> tuple[bytes, str]:
    """One /predict request body as httpx encodes it, and its content type."""
    request = httpx.Request("POST", url, files={"image": ("x.jpg", image, "image/jpeg")}, data={"metadata": META})
    return request.read(), request.headers["content-type"]


def python_load(url: str, images: list[bytes], clients: int, total: int) -> Load:
    """`clients` threads of this process, each with its own httpx connection, send `total` requests."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per_client = max(1, total // clients)

    def client(c: int) -> None:
        with httpx.Client(timeout=60) as http:
            http.post(url, files={"image": images[c % len(images)]}, data={"metadata": META})  # warm connection
            for i in range(per_client):
                data = images[(c * per_client + i) % len(images)]
                t = time.perf_counter()
                try:
                    ok = http.post(url, files={"image": ("x.jpg", data, "image/jpeg")}, data={"metadata": META})
                    ok.raise_for_status()
                except httpx.HTTPError:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return Load(len(latencies) / wall, latencies, errors[0], (time.process_time() - cpu0) / wall)


def hey_load(url: str, images: list[bytes], clients: int, total: int) -> Load:
    """`hey` (a Go load generator, Debian's package) sends `total` requests on `clients` connections,
    every one the body of the first image."""
    body, content_type = multipart(url, images[0])
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        n = max(total, clients) // clients * clients  # hey sends a whole number of requests per connection
        cmd = ["hey", "-n", str(n), "-c", str(clients), "-m", "POST", "-T", content_type]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([*cmd, "-D", f.name, "-o", "csv", url], capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [line.split(",") for line in out.stdout.splitlines()[1:] if line.strip()]
    # columns: response-time, DNS+dialup, DNS, request-write, response-delay, response-read, status-code, offset
    latencies = [float(r[0]) for r in rows if r[6] == "200"]
    wall = max((float(r[7]) + float(r[0]) for r in rows), default=float("nan"))
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    # hey leaves requests that failed without an answer (refused, timed out) out of its CSV: count them too
    return Load(len(latencies) / wall, latencies, n - len(latencies), cpu / wall)


PEER_BENTOML = "bentoml==1.4.40"
# what the core's Predictor imports (the bundle's model libraries come from its manifest)
CORE_DISTRIBUTIONS = ("numpy", "pillow", "pydantic", "cryptography", "threadpoolctl", "scipy")


def peer_venv(folder: Path, manifest) -> Path:
    """A venv of its own with BentoML and this environment's versions of the core's libraries (the
    bundle refuses other versions of its model libraries). Made once; returns its bin folder."""
    from importlib.metadata import PackageNotFoundError, version

    bin_dir = folder / "bin"
    if (bin_dir / "bentoml").exists():
        return bin_dir
    pins = []
    for name in sorted({*CORE_DISTRIBUTIONS, *manifest.library_versions}):
        for dist in (name, f"{name}-cpu"):  # bundles name xgboost-cpu by its library, xgboost
            try:
                pins.append(f"{dist}=={version(dist)}")
                break
            except PackageNotFoundError:
                continue
    print(f"building the BentoML venv in {folder} ({PEER_BENTOML} + {len(pins)} pinned libraries)", flush=True)
    uv = shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(folder)], check=True)
        install = [uv, "pip", "install", "-q", "-p", str(bin_dir / "python")]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        install = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*install, PEER_BENTOML, *pins], check=True)
    return bin_dir


def start_peer(bin_dir: Path, bundle: Path, port: int) -> subprocess.Popen:
    """`bentoml serve benchmarks.bentoml_peer:Api` on `port`, once its /readyz answers."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LESION_BUNDLE": str(bundle.resolve()), "PYTHONPATH": str(repo)}
    cmd = [str(bin_dir / "bentoml"), "serve", "benchmarks.bentoml_peer:Api", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(
        proc, f"http://127.0.0.1:{port}/readyz", "the BentoML peer (run its command by hand to see why)", 180
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of real .jpg images")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--requests", type=int, default=200, help="HTTP requests per concurrency level")
    p.add_argument("--rounds", type=int, default=40, help="in-process repetitions")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--peer", choices=["none", "bentoml"], default="none", help="also serve the bundle with BentoML")
    p.add_argument(
        "--peer-venv",
        type=Path,
        default=Path.home() / ".cache" / "lesion-bench" / "bentoml",
        help="the BentoML venv (built on first use)",
    )
    args = p.parse_args()
    print(machine_header(), flush=True)

    images = jpeg_requests(args.images, args.n_images, (600, 450))
    predictor = Predictor.load(args.bundle, intra_op_threads=os.cpu_count() or 1)
    m = predictor.manifest
    spec = m.preprocessing
    served = "refit model" if m.cnn.members == 1 else f"fold models averaged: {m.cnn.members}"
    print(f"bundle {m.bundle_id}: CNN {served}, {m.cnn.precision}, input {spec.width}x{spec.height}")
    print(f"machine: {os.cpu_count()} cores; requests: {len(images)} real images at 600x450, JPEG q90\n")

    naive = naive_script(images, spec.width, spec.height, args.rounds)
    print(f"naive torch script (one ResNet-18, per request): {naive:.1f} images/s")

    limit_numpy_blas(1)  # as the service does (LESION_BOOSTER_THREADS=1): the same in-process conditions
    meta = [ClinicalMetadata(age=55, sex="female", site="back")]
    t_request = 1 / per_second(lambda d: predictor.predict(load_for_model(d, spec)[None], meta), images, args.rounds)
    print(f"in-process Predictor, one request (decode + whole stack): {1000 * t_request:.1f} ms")
    batches = [[images[(i + j) % len(images)] for j in range(8)] for i in range(0, max(len(images) - 7, 1), 8)]
    batch8 = 8 * per_second(
        lambda b: predictor.predict(np.stack([load_for_model(d, spec) for d in b]), meta * 8), batches, args.rounds
    )
    print(f"in-process Predictor, batches of 8 (decode + whole stack): {batch8:.1f} images/s")

    decoded = np.stack([load_for_model(d, spec) for d in images[:8]])
    graphs = cnn_graphs(args.bundle, m)
    threads = os.cpu_count() or 1
    cnn = {
        prec: {b: graph_images_per_s(g, to_model_input(decoded[:b], spec), args.rounds, threads) for b in (1, 8)}
        for prec, g in graphs.items()
    }
    for prec, g in graphs.items():
        note = "" if g.parent == args.bundle else " (from the run directory, not in the bundle)"
        print(f"CNN {prec} {g.name}: batch 1 {cnn[prec][1]:.1f} images/s, batch 8 {cnn[prec][8]:.1f} images/s{note}")
    sizes = {prec: g.stat().st_size / 1e6 for prec, g in graphs.items()}
    print(f"graph sizes: {', '.join(f'{prec} {mb:.1f} MB' for prec, mb in sizes.items())}")
    if m.cnn.quantization:
        q = m.cnn.quantization
        verdict = f"passed with {q.config}" if q.passed else "failed"
        print(f"int8 gate ({verdict}): CNN top-1 agreement {q.agreement:.4f} (reported only), {q.images} OOF images")
    full = np.stack([resize_for_model(decode_opened(open_image(d)), spec) for d in images])
    drafted = np.stack([load_for_model(d, spec) for d in images])
    at_full = predictor.predict_components(full, [None] * len(full))[m.served]
    at_draft = predictor.predict_components(drafted, [None] * len(full))[m.served]
    agreement = np.mean(at_full.argmax(1) == at_draft.argmax(1))
    print(
        f"draft vs full JPEG decoding, {len(full)} images: top-1 agreement {agreement:.3f}, "
        f"max |probability difference| {np.abs(at_full - at_draft).max():.4f}"
    )

    url = f"http://127.0.0.1:{args.port}/predict"
    levels = [int(c) for c in args.clients.split(",")]
    drivers = {"python": python_load} | ({"hey": hey_load} if shutil.which("hey") else {})
    if "hey" not in drivers:
        print("(hey is not installed: apt-get install hey; the Python client alone drives HTTP)")
    http: dict[tuple[str, str], dict[int, Load]] = {}
    for mode, env in [("batching off", {"LESION_BATCH_MAX_SIZE": "1"}), ("batching on", {})]:
        proc = start_service(args.bundle, args.port, env)
        try:
            for name, load in drivers.items():
                load(url, images, 1, 4)  # warm-up
                http[mode, name] = {
                    c: load(url, images, c, args.requests if c > 1 else args.requests // 2) for c in levels
                }
        finally:
            proc.terminate()
            proc.wait(30)
        for name in drivers:
            print(f"\nHTTP, {mode}, driven by {name}:")
            for c, r in http[mode, name].items():
                print(
                    f"  {c:>2} clients: {r.rps:6.1f} requests/s   p50 {pct(r.latencies, 50):6.1f} ms   "
                    f"p99 {pct(r.latencies, 99):6.1f} ms   errors {r.errors}   load generator {r.client_cpu:.2f} cores"
                )

    native = "hey" if "hey" in drivers else "python"
    peer: dict[int, Load] = {}
    if args.peer == "bentoml":
        proc = start_peer(peer_venv(args.peer_venv, m), args.bundle, args.port + 1)
        try:
            peer_url = f"http://127.0.0.1:{args.port + 1}/predict"
            drivers[native](peer_url, images, 1, 4)  # warm-up
            peer = {
                c: drivers[native](peer_url, images, c, args.requests if c > 1 else args.requests // 2) for c in levels
            }
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"\nBentoML ({PEER_BENTOML}, adaptive batching, one worker per service), driven by {native}:")
        for c, r in peer.items():
            print(
                f"  {c:>2} clients: {r.rps:6.1f} requests/s   p50 {pct(r.latencies, 50):6.1f} ms   "
                f"p99 {pct(r.latencies, 99):6.1f} ms   errors {r.errors}"
            )

    on, off = http["batching on", native], http["batching off", native]
    print(f"\nratios (same run, same machine; HTTP figures driven by {native}):")
    if 8 in on:
        print(f"  HTTP 8 clients / naive script:              {on[8].rps / naive:.2f}x  (target >= 4)")
        print(f"  HTTP 8 clients / in-process batch of 8:     {on[8].rps / batch8:.2f}x  (target >= 0.6)")
    if 1 in on:
        p50 = statistics.median(on[1].latencies)
        print(f"  HTTP p50 at 1 client / in-process request:  {p50 / t_request:.2f}x  (target <= 1.15)")
        print(
            f"  p50 at 1 client, batching on / off:         {p50 / statistics.median(off[1].latencies):.2f}x  (limit 1.10)"
        )
    for c in levels:
        if c > 1:
            print(f"  throughput at {c} clients, batching on / off: {on[c].rps / off[c].rps:.2f}x")
    for c, r in peer.items():
        print(
            f"  throughput at {c:>2} clients, this service / BentoML: {on[c].rps / r.rps:.2f}x  (target >= 1.5; "
            f"errors {on[c].errors} vs {r.errors})"
        )
    if "int8" in cnn and "fp32" in cnn:
        for b in (1, 8):
            print(
                f"  int8 / fp32 CNN images/s at batch {b}:       {cnn['int8'][b] / cnn['fp32'][b]:.2f}x  (target >= 3)"
            )
        print(f"  int8 / fp32 graph size:                     {sizes['int8'] / sizes['fp32']:.2f}")
    else:
        print("  (int8 vs fp32 needs both graphs: train with --keep-fp32, or keep the bundle in its run directory)")


if __name__ == "__main__":
    main()
