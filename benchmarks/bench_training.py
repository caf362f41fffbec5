"""Training pipeline speed against the model-only limit, side by side in one run.

python -m benchmarks.bench_training --data-dir DIR [--image-size 128] [--batch-size 64] [--steps 20] [--compile]

1. pipeline: `training.cnn.loop.train_one_epoch` as a run uses it (the uint8 image cache on the device,
   shuffled batches, batched augmentation and normalisation there, the optimiser and schedule) over
   `steps` batches of real images, after one warm-up pass;
2. model only: the same ResNet-18, batch size, input size and precision, forward + backward +
   optimiser step on one batch already on the device (channels-last).
Prints both in images/s and their ratio: how much of the model's speed the pipeline delivers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks import machine_header
from training.cnn.batches import eval_batch
from training.cnn.loop import build_fold, train_one_epoch, train_step
from training.config import make_config
from training.data.ham10000 import decode_all, load_dataset


def model_only(t, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Images/s of forward + backward + step (the pipeline's own `train_step`) on a batch already on the device."""
    t.model.train()
    train_step(t, x, y)
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(t, x, y)
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="batches timed in each measurement")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both measurements)")
    p.add_argument("--arch", default="resnet18,efficientnet_lite0", help="CNNs measured side by side, in turn")
    p.add_argument("--freeze-stages", type=int, default=0, help="a pretrained CNN's first stages frozen")
    args = p.parse_args()
    print(machine_header(), flush=True)
    cfg = make_config(
        "cpu",
        args.data_dir,
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        freeze_stages=args.freeze_stages,
        epochs=2,
    )
    spec = cfg.image_spec()
    table = load_dataset(cfg.data_dir, log=lambda m: None).table
    n = min(len(table), args.steps * cfg.batch_size)
    images = decode_all(list(table.path[:n]), spec)
    y = table.label.to_numpy()[:n]
    rows = np.arange(n)
    speeds = {}
    for arch in cfg.arch:
        t = build_fold(0, cfg, arch, images, y, rows)
        train_one_epoch(t, spec, desc="warm-up")  # warms the kernels (and compiles, with --compile)
        _, pipeline = train_one_epoch(t, spec, desc="pipeline")
        x = eval_batch(images[: cfg.batch_size], spec, t.device)
        limit = model_only(t, x, torch.from_numpy(y[: cfg.batch_size].copy()).to(t.device), args.steps)
        device = torch.cuda.get_device_name() if t.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        frozen = f", {len(t.frozen)} stages frozen" if t.frozen else ""
        print(
            f"{arch}{frozen}: {device}; {spec.width}x{spec.height}, batch {cfg.batch_size}, {cfg.precision}, {n} real images"
        )
        compiled = ", torch.compile" if cfg.compile else ""
        print(f"  pipeline (train_one_epoch: batches augmented on the device{compiled}): {pipeline:.1f} images/s")
        print(f"  model only (forward + backward + step, data on the device): {limit:.1f} images/s")
        print(f"  ratio pipeline / model only: {pipeline / limit:.2f}")
        speeds[arch] = pipeline
    first, *others = cfg.arch
    for arch in others:
        print(f"ratio {arch} / {first} (pipeline images/s): {speeds[arch] / speeds[first]:.2f}")


if __name__ == "__main__":
    main()
