"""Several processes training one fold together (`torchrun --nproc-per-node N -m training cnn ...`).

torchrun starts N copies of the command and sets RANK, LOCAL_RANK and WORLD_SIZE. Each process
takes its share of every batch (the same global batch as one process would use, split in N), the
gradients are averaged by DistributedDataParallel, and only rank 0 writes checkpoints, out-of-fold
rows and logs. NCCL on GPUs (one per process), gloo on CPUs (how CI tests it).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world_size() > 1 else 0)
    return torch.device("cpu")


def start() -> bool:
    """Join the process group when torchrun started several processes; True if this is such a run."""
    if world_size() == 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def stop() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def replicas_agree(model: torch.nn.Module) -> bool:
    """True when every process holds the same weights (DistributedDataParallel keeps them so)."""
    if not dist.is_initialized():
        return True
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    spread = torch.stack([total, -total]).to(next(model.parameters()).device)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)  # (max over processes, -min over processes)
    return bool(spread[0] + spread[1] <= 1e-9 * max(1.0, abs(float(total))))
