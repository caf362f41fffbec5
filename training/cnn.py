"""Stage 2: ResNet-18 per fold -> out-of-fold probabilities; the fold models become the served CNN.

Each fold trains on the other folds' lesions with augmentations, validates on its own fold with
the evaluation transform, and keeps the epoch with the best validation BMCA. Its OOF probabilities
come from that model, which never saw the fold's lesions. A per-epoch checkpoint lets a killed
run resume inside a fold; finished folds are skipped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from service import labels
from service.preprocess import ImageSpec
from training.config import RunConfig
from training.dataset import ImageDataset, normalise_batch
from training.io import atomic_write, atomic_write_csv, atomic_write_text
from training.models import build_resnet18

PROB_COLUMNS = [f"p_{c}" for c in labels.CLASSES]


def image_spec(cfg: RunConfig) -> ImageSpec:
    return ImageSpec(width=cfg.image_size, height=cfg.image_height)


def device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype | None]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.bfloat16 if precision == "bf16" else None)


@torch.no_grad()
def predict_probs(model: nn.Module, images: np.ndarray, spec: ImageSpec, batch_size: int = 256) -> np.ndarray:
    """Evaluation transform, float32: the same numbers the exported graph gives."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        x = normalise_batch(batch, spec).to(device)
        out.append(model(x).float().softmax(dim=1).cpu().numpy())
    probs = np.concatenate(out).astype(np.float64)
    return probs / probs.sum(axis=1, keepdims=True)  # exact sums for sklearn's log_loss check


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, mean 1: balances the loss toward BMCA."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = counts.sum() / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def train_fold(
    k: int,
    cfg: RunConfig,
    images: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    cnn_dir: Path,
    precision: str,
    log=print,
) -> dict:
    """Train fold k; returns its history. Writes fold{k}.pt (best weights) last, atomically."""
    device, amp_dtype = device_and_dtype(precision)
    spec = image_spec(cfg)
    tr, va = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
    torch.manual_seed(cfg.seed + k)
    model = build_resnet18(len(labels.CLASSES), cfg.weights).to(device, memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y[tr], len(labels.CLASSES)).to(device), label_smoothing=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loader = DataLoader(
        ImageDataset(images[tr], y[tr], augment=True),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(tr) > cfg.batch_size,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed + k),
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.2)

    ckpt_path = cnn_dir / f"fold{k}.ckpt"
    state = {"epoch": 0, "best": None, "best_bmca": -1.0, "history": []}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        state = ckpt["state"]
        log(f"fold {k}: resuming after epoch {state['epoch']}")

    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        t0, seen, total_loss = time.perf_counter(), 0, 0.0
        bar = tqdm(loader, desc=f"fold {k} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=None)
        for xb, yb in bar:
            x, yb = normalise_batch(xb, spec).to(device), yb.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(yb)
            total_loss += loss.item() * len(yb)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        train_ips = seen / (time.perf_counter() - t0)
        probs = predict_probs(model, images[va], spec)
        bmca = balanced_accuracy_score(y[va], probs.argmax(1))
        vloss = log_loss(y[va], probs, labels=range(len(labels.CLASSES)))
        record = dict(
            epoch=epoch + 1,
            train_loss=total_loss / seen,
            val_bmca=bmca,
            val_log_loss=vloss,
            train_images_per_s=train_ips,
        )
        state["history"].append(record)
        log(
            f"fold {k} epoch {epoch + 1}: train loss {record['train_loss']:.3f}, val BMCA {bmca:.3f}, "
            f"val log loss {vloss:.3f}, {train_ips:.0f} train img/s"
        )
        if bmca > state["best_bmca"]:
            state.update(best_bmca=bmca, best_epoch=epoch + 1, best=copy.deepcopy(model.state_dict()))
        state["epoch"] = epoch + 1
        payload = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state}
        atomic_write(ckpt_path, lambda p, payload=payload: torch.save(payload, p))

    model.load_state_dict(state["best"])
    oof = pd.DataFrame(predict_probs(model, images[va], spec), columns=PROB_COLUMNS)
    oof.insert(0, "row", va)
    atomic_write_csv(cnn_dir / f"oof_fold{k}.csv", oof)
    summary = {
        "fold": k,
        "best_epoch": state["best_epoch"],
        "best_val_bmca": state["best_bmca"],
        "history": state["history"],
    }
    atomic_write_text(cnn_dir / f"fold{k}.json", json.dumps(summary, indent=2))
    atomic_write(cnn_dir / f"fold{k}.pt", lambda p: torch.save({k_: v.cpu() for k_, v in state["best"].items()}, p))
    ckpt_path.unlink(missing_ok=True)
    return summary


def load_fold_model(cnn_dir: Path, k: int) -> nn.Module:
    model = build_resnet18(len(labels.CLASSES), "none")
    model.load_state_dict(torch.load(cnn_dir / f"fold{k}.pt", map_location="cpu", weights_only=True))
    return model.eval()


def run_cnn(
    cfg: RunConfig, run_dir: Path, table: pd.DataFrame, images: np.ndarray, precision: str, log=print
) -> pd.DataFrame:
    """Train every unfinished fold, then write artifacts/oof_cnn.csv. Returns the OOF table."""
    cnn_dir = run_dir / "cnn"
    cnn_dir.mkdir(parents=True, exist_ok=True)
    y, fold = table.label.to_numpy(), table.fold.to_numpy()
    for k in range(cfg.folds):
        if (cnn_dir / f"fold{k}.pt").exists():
            log(f"fold {k}: already trained, skipping")
            continue
        train_fold(k, cfg, images, y, fold, cnn_dir, precision, log)

    parts = [pd.read_csv(cnn_dir / f"oof_fold{k}.csv") for k in range(cfg.folds)]
    oof = pd.concat(parts).sort_values("row")
    assert len(oof) == len(table) and (oof.row.to_numpy() == np.arange(len(table))).all(), "OOF rows incomplete"
    oof = pd.concat(
        [table[["image_id", "fold"]].reset_index(drop=True), oof[PROB_COLUMNS].reset_index(drop=True)], axis=1
    )
    atomic_write_csv(run_dir / "artifacts" / "oof_cnn.csv", oof)
    return oof


def training_throughput(run_dir: Path, folds: int) -> float:
    """Mean training images/s over every epoch of every fold, from the fold summaries."""
    rates = []
    for k in range(folds):
        rates += [
            h["train_images_per_s"] for h in json.loads((run_dir / "cnn" / f"fold{k}.json").read_text())["history"]
        ]
    return float(np.mean(rates)) if rates else math.nan


def export_cnn(run) -> None:
    """The fold models, averaged in one ONNX graph: cnn/cnn.onnx, parity-checked on real images."""
    from training.export import export_onnx

    members = [load_fold_model(run.dir / "cnn", k) for k in range(run.cfg.folds)]
    rng = np.random.default_rng(run.cfg.seed)
    idx = np.sort(rng.choice(len(run.table), size=min(32, len(run.table)), replace=False))
    export_onnx(members, image_spec(run.cfg), run.images[idx], run.dir / "cnn" / "cnn.onnx", log=run.log)
