"""Stage 2: each CNN per fold -> out-of-fold probabilities; the fold models become the served CNN.

Each fold trains on the other folds' lesions with augmentations for a fixed number of epochs and
keeps the last one, as the refit model does. Its OOF probabilities come from that model, which
never saw the fold's lesions, and nothing about it was chosen with the fold's labels: the fold is
validated after every epoch with the evaluation transform only to record a learning curve
(picking the best epoch on it would make the OOF figures optimistic). A per-epoch checkpoint lets
a killed run resume inside a fold; finished folds are skipped.

The pieces, as in torchvision's reference scripts: `build_fold` (model, loss, optimiser, data,
schedule), `train_one_epoch`, `evaluate`, `write_fold_outputs`; `train_fold` strings them together.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss
from torch import nn
from tqdm import tqdm

from service.core import labels
from service.core.preprocess import ImageSpec
from training.cnn import distributed
from training.cnn.batches import TrainBatches, augment_batch, eval_batch, normalise, train_augmentation
from training.cnn.models import FoldEnsemble, build_model, freeze_stages, parameter_groups, resolve_weights
from training.config import RunConfig, cnn_name
from training.data.io import PROB_COLUMNS, atomic_write, atomic_write_csv, atomic_write_text, write_oof
from training.errors import RunError
from training.layout import CnnLayout, RunLayout
from training.run import Run


def device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype | None]:
    return distributed.device(), (torch.bfloat16 if precision == "bf16" else None)


@torch.no_grad()
def predict_probs(
    model: nn.Module, images: np.ndarray, spec: ImageSpec, tta: bool = False, batch_size: int = 256
) -> np.ndarray:
    """Evaluation transform, float32 (with `tta`, the 8 dihedral views averaged): the same numbers
    the exported graph gives."""
    model.eval()
    device = next(model.parameters()).device
    net = FoldEnsemble([model], tta)
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_batch(images[start : start + batch_size], spec, device)
        out.append(net(x).cpu().numpy())
    probs = np.concatenate(out).astype(np.float64)
    return probs / probs.sum(axis=1, keepdims=True)  # exact sums for sklearn's log_loss check


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, mean 1: balances the loss toward BMCA."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = counts.sum() / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


@dataclass
class FoldTraining:
    """Everything one fold's training loop touches; `state` is what a checkpoint resumes."""

    k: int
    model: nn.Module  # what is saved and evaluated
    net: nn.Module  # what trains: the model, or its DistributedDataParallel wrapper under torchrun
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    batches: TrainBatches
    augment: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    frozen: list[nn.Module] = field(default_factory=list)  # stages kept in eval mode with their weights
    state: dict = field(default_factory=lambda: {"epoch": 0, "history": []})


def build_fold(
    k: int, cfg: RunConfig, arch: str, images: np.ndarray, y: np.ndarray, train_rows: np.ndarray
) -> FoldTraining:
    """Model, weighted loss, AdamW, the training rows' batches on the device, one-cycle schedule.

    A pretrained model is fine-tuned: its first `cfg.freeze_stages` stages frozen, its backbone at
    `cfg.backbone_lr_scale` times the head's learning rate (one-cycle warms both up)."""
    device, amp_dtype = device_and_dtype(cfg.precision)
    torch.manual_seed(cfg.seed + k)
    n_classes = len(labels.CLASSES)
    model = build_model(arch, n_classes, cfg.weights).to(device).to(memory_format=torch.channels_last)
    frozen: list[nn.Module] = []
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": cfg.lr}]
    if resolve_weights(arch, cfg.weights) != "none":
        frozen = freeze_stages(model, cfg.freeze_stages)
        groups = parameter_groups(model, cfg.lr, cfg.backbone_lr_scale)
    if cfg.compile:
        model.compile()  # in place: state_dict keys, checkpoints and export stay those of the plain model
    net, rank, world = model, distributed.rank(), distributed.world_size()
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + k + 7919 * rank)  # same initial weights, each process its own augmentations
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights(y[train_rows], n_classes).to(device), label_smoothing=cfg.label_smoothing
    )
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = TrainBatches(images[train_rows], y[train_rows], cfg.batch_size, device, cfg.seed + k, rank, world)
    steps = cfg.epochs * len(batches)
    max_lr = [float(g["lr"]) for g in groups]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=warmup_share(steps))
    augment = train_augmentation().to(device)
    return FoldTraining(k, model, net, loss_fn, opt, sched, batches, augment, device, amp_dtype, frozen)


def save_checkpoint(t: FoldTraining, path: Path) -> None:
    payload = {
        "model": t.model.state_dict(),
        "opt": t.opt.state_dict(),
        "sched": t.sched.state_dict(),
        "state": t.state,
    }
    atomic_write(path, lambda p: torch.save(payload, p))


def load_checkpoint(t: FoldTraining, path: Path) -> None:
    ckpt = torch.load(path, map_location=t.device, weights_only=False)
    t.model.load_state_dict(ckpt["model"])
    t.opt.load_state_dict(ckpt["opt"])
    t.sched.load_state_dict(ckpt["sched"])
    t.state = {"epoch": ckpt["state"]["epoch"], "history": ckpt["state"]["history"]}  # older ones also held "best"


def train_step(t: FoldTraining, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward (autocast), backward and optimiser step on one batch already on the device; the loss."""
    with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
        loss = t.loss_fn(t.net(x), y)
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()
    return loss


def train_one_epoch(t: FoldTraining, spec: ImageSpec, desc: str) -> tuple[float, float]:
    """One pass over the augmented training rows; returns (mean loss, images/s).

    The loss is summed on the device and read every 20 steps: reading it each step would make a
    GPU wait for every batch."""
    t.net.train()
    for module in t.frozen:  # frozen stages keep their batch-norm statistics too
        module.eval()
    start, seen, total_loss = time.perf_counter(), 0, torch.zeros((), device=t.device)
    bar = tqdm(t.batches, desc=desc, unit="batch", leave=False, disable=None)
    for step, (xb, yb) in enumerate(bar):
        loss = train_step(t, augment_batch(t.augment, xb, spec), yb)
        t.sched.step()
        seen += len(yb)
        total_loss += loss.detach().float() * len(yb)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}")
    mean_loss = total_loss.item() / seen  # waits for the last step, so the clock below is honest
    return mean_loss, seen * t.batches.world / (time.perf_counter() - start)  # every process's images


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, y: np.ndarray, spec: ImageSpec, tta: bool, batch_size: int = 256
) -> tuple[float, float]:
    """Validation BMCA and log loss, for the learning curve: the evaluation transform (float32, no
    augmentation) on the validation rows' uint8 images (N,3,H,W) already on the device. `normalise`
    is the device twin of the service's `to_model_input`, so a GPU is not left waiting on the host."""
    model.eval()
    net = FoldEnsemble([model], tta)
    out = [net(normalise(images[s : s + batch_size].float() / 255.0, spec)) for s in range(0, len(images), batch_size)]
    probs = torch.cat(out).double().cpu().numpy()
    probs /= probs.sum(axis=1, keepdims=True)
    return balanced_accuracy_score(y, probs.argmax(1)), log_loss(y, probs, labels=range(len(labels.CLASSES)))


def write_fold_outputs(
    t: FoldTraining, images: np.ndarray, val_rows: np.ndarray, spec: ImageSpec, tta: bool, paths: CnnLayout
) -> dict:
    """The last epoch's OOF rows, the fold summary, and its weights last (fold<k>.pt marks the fold done)."""
    k, state = t.k, t.state
    oof = pd.DataFrame(predict_probs(t.model, images[val_rows], spec, tta), columns=PROB_COLUMNS)
    oof.insert(0, "row", val_rows)
    atomic_write_csv(paths.fold_oof(k), oof)
    summary = {
        "fold": k,
        "epochs": state["epoch"],
        "val_bmca": state["history"][-1]["val_bmca"],  # the kept (last) epoch's
        "history": state["history"],
    }
    atomic_write_text(paths.fold_summary(k), json.dumps(summary, indent=2))
    weights = {n: v.cpu() for n, v in t.model.state_dict().items()}
    atomic_write(paths.fold_model(k), lambda p: torch.save(weights, p))
    return summary


def train_fold(
    k: int,
    cfg: RunConfig,
    arch: str,
    images: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    paths: CnnLayout,
    log=print,
) -> dict:
    """Train fold k on the other folds, keep its last epoch, write its OOF rows; returns its summary."""
    spec = cfg.image_spec()
    train_rows, val_rows = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
    t = build_fold(k, cfg, arch, images, y, train_rows)
    val_images = torch.from_numpy(images[val_rows]).to(t.device).permute(0, 3, 1, 2)
    ckpt_path = paths.fold_model(k).with_suffix(".ckpt")
    if ckpt_path.exists():
        load_checkpoint(t, ckpt_path)
        log(f"fold {k}: resuming after epoch {t.state['epoch']}")
    for epoch in range(t.state["epoch"] + 1, cfg.epochs + 1):
        train_loss, ips = train_one_epoch(t, spec, desc=f"{paths.name} fold {k} epoch {epoch}/{cfg.epochs}")
        bmca, vloss = evaluate(t.model, val_images, y[val_rows], spec, cfg.tta)
        t.state["history"].append(
            dict(epoch=epoch, train_loss=train_loss, val_bmca=bmca, val_log_loss=vloss, train_images_per_s=ips)
        )
        log(
            f"{paths.name} fold {k} epoch {epoch}: train loss {train_loss:.3f}, val BMCA {bmca:.3f}, "
            f"val log loss {vloss:.3f}, {ips:.0f} train img/s"
        )
        t.state["epoch"] = epoch
        if distributed.is_main():  # under torchrun every process holds the same model; one writes
            save_checkpoint(t, ckpt_path)
    if not distributed.replicas_agree(t.model):
        raise RunError(f"fold {k}: the torchrun processes ended with different weights")
    summary = {}
    if distributed.is_main():
        summary = write_fold_outputs(t, images, val_rows, spec, cfg.tta, paths)
        ckpt_path.unlink(missing_ok=True)
    distributed.barrier()
    return summary


def warmup_share(steps: int) -> float:
    """OneCycleLR's pct_start: a fifth of the steps warm up, except where that is exactly one step,
    on which PyTorch divides by zero (its warm-up phase would end at step 0: 5 steps, as a small
    refit without its calibration rows had)."""
    return 0.25 if math.isclose(0.2 * steps, 1) else 0.2


def train_refit(cfg: RunConfig, arch: str, images: np.ndarray, y: np.ndarray, rows: np.ndarray, log=print) -> nn.Module:
    """One model on all `rows` with the folds' recipe (cfg.epochs, the same one-cycle schedule),
    keeping the last epoch, as the fold models do."""
    spec = cfg.image_spec()
    t = build_fold(cfg.folds, cfg, arch, images, y, rows)  # seed cfg.seed + folds: unlike any fold model's
    for epoch in range(1, cfg.epochs + 1):
        loss, ips = train_one_epoch(t, spec, desc=f"{cnn_name(arch)} refit epoch {epoch}/{cfg.epochs}")
        log(f"{cnn_name(arch)} refit epoch {epoch}: train loss {loss:.3f}, {ips:.0f} train img/s")
    return t.model.float().eval().cpu()


def served_members(run: Run, arch: str) -> list[nn.Module]:
    """The CNN the bundle serves, loaded: the model refit on every row but the calibration lesions
    (cnn/refit.pt, which the export stage trains), or with --served-cnn ensemble the fold models,
    averaged in the graph. The fold models always give the out-of-fold predictions the boosters and
    the report use."""
    paths = run.paths.cnn(cnn_name(arch))
    if run.cfg.served_cnn == "ensemble":
        return [load_fold_model(paths, arch, k) for k in range(run.cfg.folds)]
    if not paths.refit.exists():
        raise RunError(f"{paths.refit} is missing: run the export stage again (delete {paths.fp32_graph})")
    return [load_model(arch, paths.refit)]


def load_model(arch: str, path: Path) -> nn.Module:
    model = build_model(arch, len(labels.CLASSES), "none")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_fold_model(paths: CnnLayout, arch: str, k: int) -> nn.Module:
    return load_model(arch, paths.fold_model(k))


def run_cnn(
    cfg: RunConfig,
    arch: str,
    run_paths: RunLayout,
    table: pd.DataFrame,
    images: np.ndarray,
    log=print,
    only: int | None = None,
) -> pd.DataFrame | None:
    """Train every unfinished fold of CNN `arch` (or only fold `only`), then, once every fold is
    done, write artifacts/oof_<cnn>.csv and return the OOF table. Folds trained by separate
    processes (one per pod of a cluster job) meet in the same run directory; the last one to finish
    writes the table."""
    paths = run_paths.cnn(cnn_name(arch))
    cnn_dir = paths.dir
    cnn_dir.mkdir(parents=True, exist_ok=True)
    y, fold = table.label.to_numpy(), table.fold.to_numpy()
    log = log if distributed.is_main() else (lambda m: None)
    if distributed.start():
        log(f"torchrun: {distributed.world_size()} processes train each fold together")
    for k in range(cfg.folds) if only is None else [only]:
        if paths.fold_model(k).exists():
            log(f"{paths.name} fold {k}: already trained, skipping")
            if kept_best_epoch(paths, k):
                log(f"warning: fold {k} {OLD_RULE}; delete {cnn_dir} to retrain it with the last epoch kept")
            continue
        train_fold(k, cfg, arch, images, y, fold, paths, log)
    distributed.stop()  # not on an error: torchrun ends the other processes, a barrier could hang them
    if not distributed.is_main():
        return None
    waiting = [k for k in range(cfg.folds) if not paths.fold_model(k).exists()]
    if waiting:
        log(f"{paths.name} fold {only} done; folds {', '.join(map(str, waiting))} still to train")
        return None

    oof = pd.concat([pd.read_csv(paths.fold_oof(k)) for k in range(cfg.folds)]).sort_values("row")
    if len(oof) != len(table) or not (oof.row.to_numpy() == np.arange(len(table))).all():
        raise RunError(f"{cnn_dir}: the folds' OOF rows do not cover the dataset once; delete {cnn_dir} and rerun")
    path = run_paths.oof(paths.name)
    write_oof(path, table, oof[PROB_COLUMNS].to_numpy())
    return pd.read_csv(path)


OLD_RULE = "was trained before fold models kept their last epoch: its OOF rows come from its best validation epoch"


def kept_best_epoch(paths: CnnLayout, k: int) -> bool:
    """True for a fold trained by an older version, which kept the epoch that scored best on the fold
    itself (its out-of-fold figures are slightly optimistic)."""
    return "best_epoch" in json.loads(paths.fold_summary(k).read_text())
