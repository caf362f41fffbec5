"""bf16 autocast vs fp32: ResNet-18 training steps on this CPU, interleaved so both see the same load.

python -m benchmarks.bench_precision [--size 128] [--rounds 5]
Prints images/s for each and the ratio bf16/fp32.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.models import resnet18

from benchmarks import machine_header


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(machine_header(), flush=True)
    torch.manual_seed(0)
    model = resnet18(num_classes=7).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(args.batch, 3, args.size * 3 // 4, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (args.batch,))

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    step(True), step(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):  # interleaved: both see the same machine load
        for bf16 in (True, False):
            times[bf16].append(step(bf16))
    ips = {k: args.batch / (sum(v) / len(v)) for k, v in times.items()}
    print(f"training {args.size}x{args.size * 3 // 4}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"fp32: {ips[False]:.0f} img/s   bf16: {ips[True]:.0f} img/s   ratio bf16/fp32: {ips[True] / ips[False]:.2f}")


if __name__ == "__main__":
    main()
