"""Batch scoring through /predict/batch against one /predict per image, side by side on one service.

python -m benchmarks.bench_scoring --bundle DIR --data-dir DIR [--in-flight 4]

Starts the service on the bundle, then scores the same images (a HAM10000-style metadata CSV beside
its images) twice: (1) the previous client's path, one `/predict` per image in a loop with the sync
client; (2) `lesion-client score`'s path, `/predict/batch` at the server's batch limit with a few
requests in flight. Prints both wall times and their ratio, and checks that both gave the same labels.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import tempfile
import time
from pathlib import Path

from lesion_client import AsyncLesionClient, LesionClient
from lesion_client.scoring import read_source, score

from benchmarks import machine_header
from benchmarks.bench_serving import start_service


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="HAM10000_metadata.csv beside its images")
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--port", type=int, default=8766)
    args = p.parse_args()
    print(machine_header(), flush=True)
    source = next(args.data_dir.rglob("HAM10000_metadata.csv"))
    jobs = read_source(source).jobs
    proc = start_service(args.bundle, args.port, {})
    url = f"http://127.0.0.1:{args.port}"
    try:
        start = time.perf_counter()
        with LesionClient(url) as client:
            one_by_one = {j.key: client.predict(j.path, **j.metadata).label for j in jobs}
        t_single = time.perf_counter() - start

        async def batched(out: Path) -> None:
            async with AsyncLesionClient(url, timeout=300) as client:
                await score(client, source, out, args.in_flight)

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            asyncio.run(batched(Path(tmp) / "out.csv"))
            t_batch = time.perf_counter() - start
            with open(Path(tmp) / "out.csv", newline="") as f:
                scored = {r["image_id"]: r["label"] for r in csv.DictReader(f)}
    finally:
        proc.terminate()
        proc.wait(10)
    same = sum(scored.get(k) == v for k, v in one_by_one.items())
    print(f"{len(jobs)} images of {source}")
    print(f"one /predict per image (the previous client): {t_single:.1f} s, {len(jobs) / t_single:.1f} images/s")
    print(
        f"lesion-client score (/predict/batch, {args.in_flight} in flight): {t_batch:.1f} s, {len(jobs) / t_batch:.1f} images/s"
    )
    print(f"ratio batch scoring / one by one: {t_single / t_batch:.2f}x; same label for {same}/{len(jobs)} images")


if __name__ == "__main__":
    main()
