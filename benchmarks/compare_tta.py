"""Test-time augmentation on a finished run: its out-of-fold gain and its serving cost, side by side.

python -m benchmarks.compare_tta --run RUN_DIR [--data-dir DIR]

1. accuracy: every fold model scores the fold it never saw, once as trained and once with the 8
   dihedral views averaged (the cnn stage's own `predict_probs`); the CNN's out-of-fold metrics both
   ways. The fold models were trained without TTA, so this is the gain of switching it on at
   prediction time; a run with `--tta` also records its learning curve with it.
2. cost: the served CNN (RUN_DIR/cnn/refit.pt, or the fold models) exported with and without TTA,
   onnxruntime images/s at batch 1 and 8 on this machine's CPU, and their ratio.
The stack's gain needs the boosters retrained on TTA out-of-fold features: `python -m training run --tta`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import machine_header
from benchmarks.bench_inference import graph_images_per_s
from service.core.preprocess import to_model_input
from training.cnn.loop import load_fold_model, predict_probs, served_members
from training.cnn.onnx import export_onnx
from training.config import saved_config
from training.evaluation.metrics import all_metrics
from training.run import Run

KEYS = ("bmca", "macro_auc", "malignant_auc", "malignant_pauc", "log_loss", "ece")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run directory whose cnn stage is done")
    p.add_argument("--data-dir", help="the run's data, if it moved since (default: the run's config)")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    print(machine_header(), flush=True)
    cfg = saved_config(args.run, data_dir=args.data_dir)
    if cfg.tta:
        raise SystemExit(f"{args.run} was trained with --tta; compare on a run without it")
    run = Run(cfg, args.run, log=lambda m: None)
    spec, y, fold = cfg.image_spec(), run.table.label.to_numpy(), run.table.fold.to_numpy()

    oof = {False: np.zeros((len(y), 7)), True: np.zeros((len(y), 7))}
    for k in range(cfg.folds):
        model, rows = load_fold_model(run.paths.cnn(cfg.cnns[0]), cfg.arch[0], k), np.flatnonzero(fold == k)
        for tta in oof:
            oof[tta][rows] = predict_probs(model, run.images[rows], spec, tta)
    scores = {tta: all_metrics(y, probs) for tta, probs in oof.items()}

    members = served_members(run, cfg.arch[0])
    with tempfile.TemporaryDirectory() as tmp:
        paths = {tta: Path(tmp) / f"tta{int(tta)}.onnx" for tta in oof}
        for tta, path in paths.items():
            export_onnx(members, spec, run.images[:8], path, tta, log=lambda m: None)
        x = {b: to_model_input(run.images[:b], spec) for b in (1, 8)}
        speed = {tta: {b: graph_images_per_s(path, x[b], args.rounds) for b in x} for tta, path in paths.items()}

    print(f"{args.run}: {len(y)} images, {cfg.folds} lesion-grouped folds, {spec.width}x{spec.height}")
    print(f"CNN out-of-fold {'':14s}" + "".join(f"{k:>15s}" for k in KEYS))
    for tta, s in scores.items():
        print(f"{'8 views (TTA)' if tta else 'one view':30s}" + "".join(f"{s[k]:15.4f}" for k in KEYS))
    print(f"{'TTA - one view':30s}" + "".join(f"{scores[True][k] - scores[False][k]:+15.4f}" for k in KEYS))
    served = f"{cfg.served_cnn} CNN ({len(members)} model{'s' if len(members) > 1 else ''})"
    for b in (1, 8):
        one, eight = speed[False][b], speed[True][b]
        print(
            f"served {served}, CPU images/s at batch {b}: one view {one:.1f}, TTA {eight:.1f}, cost {one / eight:.1f}x"
        )


if __name__ == "__main__":
    main()
