"""Fine-tuning recipes for a CPU, compared on one lesion-grouped fold: which settings the presets use.

Each recipe trains the project's own cnn stage (`training.cnn.loop`, the same code as a run) on
the other folds and is scored on fold `--fold`, which it never saw: BMCA, macro AUC, malignant AUC
and pAUC with lesion-bootstrap intervals, the paired difference against the first recipe, and the
training speed. Every recipe's run folder is resumable (a killed comparison goes on where it stopped):

    python -m benchmarks.compare_finetuning --data-dir ../shared/data/ham10000 --out /tmp/recipes

One fold of the sample is a small test set (about 420 images): differences inside the intervals
are not differences. The recipes are fixed below, before any was run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import machine_header
from training.config import make_config
from training.data.io import PROB_COLUMNS
from training.evaluation.metrics import with_intervals
from training.layout import RunLayout
from training.pipeline import run_pipeline
from training.reporting.markdown import metrics_table

LITE0 = dict(arch="efficientnet_lite0", weights="imagenet")
# name -> RunConfig overrides of the cpu preset (5 folds, 128x96, batch 64)
RECIPES: dict[str, dict] = {
    "resnet18-scratch": dict(arch="resnet18", weights="none", lr=2e-3, epochs=5),
    "lite0-uniform-lr": dict(LITE0, lr=1e-3, backbone_lr_scale=1.0, epochs=5),
    "lite0-discriminative": dict(LITE0, lr=2e-3, backbone_lr_scale=0.25, epochs=5),
    "lite0-discriminative-frozen4": dict(LITE0, lr=2e-3, backbone_lr_scale=0.25, freeze_stages=4, epochs=5),
    "lite0-discriminative-3ep": dict(LITE0, lr=2e-3, backbone_lr_scale=0.25, epochs=3),
    "lite0-discriminative-8ep": dict(LITE0, lr=2e-3, backbone_lr_scale=0.25, epochs=8),
}


def train(name: str, data_dir: str, out: Path, fold: int, seed: int) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """The recipe's fold model, trained (or resumed); its held-out probabilities, rows and summary."""
    cfg = make_config("cpu", data_dir, int8=False, seed=seed, **RECIPES[name])
    run = run_pipeline(cfg, out / name, ["folds", "cnn"], log=lambda m: print(f"[{name}] {m}", flush=True), fold=fold)
    paths = RunLayout(run.dir).cnn(cfg.cnns[0])
    oof = pd.read_csv(paths.fold_oof(fold))
    return (
        oof[PROB_COLUMNS].to_numpy(),
        run.table.iloc[oof.row.to_numpy()],
        json.loads(paths.fold_summary(fold).read_text()),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, type=Path, help="a folder for the recipes' run folders")
    p.add_argument("--fold", type=int, default=0, help="the held-out fold of the cpu preset's 5")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names; the first is the baseline")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    print(machine_header(), flush=True)
    names = args.recipes.split(",")
    results = {name: train(name, args.data_dir, args.out, args.fold, args.seed) for name in names}
    rows = results[names[0]][1]
    if any(not np.array_equal(r[1].image_id.to_numpy(), rows.image_id.to_numpy()) for r in results.values()):
        raise SystemExit("the recipes' folds differ: same data and seed needed")
    probs = {name: r[0] for name, r in results.items()}
    y, lesions = rows.label.to_numpy(), rows.lesion_id.to_numpy()
    pair = (names[1], names[0]) if len(names) > 1 else ("", "")
    report = with_intervals(y, probs, lesions, args.bootstrap, 0, pair)
    print(f"\n# Fine-tuning recipes: fold {args.fold} of 5 ({len(y)} held-out images, {len(set(lesions))} lesions)\n")
    print("\n".join(metrics_table(report)))
    for name in names[2:]:
        print(
            metrics_table(
                with_intervals(
                    y, {names[0]: probs[names[0]], name: probs[name]}, lesions, args.bootstrap, 0, (name, names[0])
                )
            )[-1]
        )
    print("\n| recipe | settings | train images/s | validation BMCA by epoch |\n|---|---|---|---|")
    for name, (_, _, summary) in results.items():
        history = summary["history"]
        speed = np.mean([h["train_images_per_s"] for h in history])
        curve = ", ".join(f"{h['val_bmca']:.3f}" for h in history)
        print(f"| {name} | {RECIPES[name]} | {speed:.1f} | {curve} |")


if __name__ == "__main__":
    main()
