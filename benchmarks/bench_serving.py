"""Serving speed of a bundle against the script people would write instead, side by side in one run.

python -m benchmarks.bench_serving --bundle runs/x/bundle [--images DIR] [--requests 200]
(a fresh clone: `make train-demo`, then --bundle runs/demo/bundle --images demo-data/HAM10000_images_part_1)

Measured in this order, on the same machine, in one run:
1. the naive per-request script: torch eager ResNet-18 (one model, not an ensemble), torchvision
   transforms, PIL decoding, one image at a time on every core, at the bundle's input size;
2. the in-process Predictor (decode + the whole stack) for one request, int8 and fp32 CNN graphs at
   batch 1 and 8 when the bundle carries both;
3. the service over HTTP (uvicorn subprocess, one worker) at 1, 8 and 32 concurrent clients, with
   micro-batching off (LESION_BATCH_MAX_SIZE=1) and on (the default settings).
Requests are real HAM10000 images, upscaled to the originals' 600x450 and JPEG-encoded. The client
runs on the same machine as the server, so at high concurrency both share the cores.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import subprocess
import sys
import threading
import time
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


def start_service(bundle: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service", "--bundle", str(bundle), "--port", str(port)]
    proc = subprocess.Popen(cmd, env={**os.environ, "LESION_LOG_LEVEL": "warning", **env})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit("the service did not start")
        time.sleep(0.3)
    proc.kill()
    sys.exit("the service was not ready after 120 s")


def drive(url: str, images: list[bytes], clients: int, total: int) -> tuple[float, list[float]]:
    """`clients` threads, each with its own connection, send `total` requests in all.
    Returns (requests/s, latencies in seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, total // clients)

    def client(c: int) -> None:
        with httpx.Client(timeout=60) as http:
            http.post(url, files={"image": images[c % len(images)]}, data={"metadata": META})  # warm connection
            for i in range(per_client):
                data = images[(c * per_client + i) % len(images)]
                t = time.perf_counter()
                r = http.post(url, files={"image": ("x.jpg", data, "image/jpeg")}, data={"metadata": META})
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise SystemExit(f"HTTP {r.status_code}: {r.text[:200]}")
                with lock:
                    latencies.append(dt)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - t0), latencies


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
        print(
            f"int8 gate ({'passed' if q.passed else 'failed'}): top-1 agreement {q.agreement:.4f}, {q.images} OOF images"
        )
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
    http: dict[str, dict[int, tuple[float, list[float]]]] = {}
    for mode, env in [("batching off", {"LESION_BATCH_MAX_SIZE": "1"}), ("batching on", {})]:
        proc = start_service(args.bundle, args.port, env)
        try:
            http[mode] = {c: drive(url, images, c, args.requests if c > 1 else args.requests // 2) for c in levels}
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"\nHTTP, {mode}:")
        for c, (rps, lat) in http[mode].items():
            print(f"  {c:>2} clients: {rps:6.1f} requests/s   p50 {pct(lat, 50):6.1f} ms   p99 {pct(lat, 99):6.1f} ms")

    on, off = http["batching on"], http["batching off"]
    print("\nratios (same run, same machine):")
    if 8 in on:
        print(f"  HTTP 8 clients / naive script:              {on[8][0] / naive:.2f}x  (target >= 4)")
    if 1 in on:
        p50 = statistics.median(on[1][1])
        print(f"  HTTP p50 at 1 client / in-process request:  {p50 / t_request:.2f}x  (target <= 1.15)")
        print(f"  p50 at 1 client, batching on / off:         {p50 / statistics.median(off[1][1]):.2f}x  (limit 1.10)")
    for c in levels:
        if c > 1:
            print(f"  throughput at {c} clients, batching on / off: {on[c][0] / off[c][0]:.2f}x")
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
