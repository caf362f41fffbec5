"""Which CNN should a bundle serve? The fold ensemble against one refit model, on lesions neither saw.

python -m benchmarks.compare_served_cnn --data-dir DIR [--preset cpu] [--epochs N] [--image-size W]

The last of the lesion-grouped folds is held out. On the other folds, the fold ensemble is trained as
`training` trains it (one model per inner fold, last epoch kept) and one model is
refit on all of them with the same recipe (`--served-cnn refit`). Both, and the ensemble's members
alone, are scored on the held-out lesions; their CNN cost per image is measured side by side in
onnxruntime on this machine's CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import machine_header
from benchmarks.bench_inference import graph_images_per_s
from service.core.preprocess import to_model_input
from training.cnn.loop import load_fold_model, predict_probs, train_fold, train_refit
from training.cnn.onnx import export_onnx
from training.config import PRESETS, make_config
from training.data.folds import ensure_folds
from training.data.ham10000 import decode_all, load_dataset
from training.evaluation.metrics import all_metrics
from training.layout import RunLayout

KEYS = ("bmca", "macro_auc", "malignant_auc", "malignant_pauc", "log_loss")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    args = p.parse_args()
    print(machine_header(), flush=True)
    cfg = make_config(args.preset, args.data_dir, epochs=args.epochs, image_size=args.image_size)
    spec = cfg.image_spec()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        paths = RunLayout(tmp)
        table = ensure_folds(load_dataset(cfg.data_dir).table, paths.folds, cfg.folds, cfg.seed)
        images = decode_all(list(table.path), spec)
        y, fold = table.label.to_numpy(), table.fold.to_numpy()
        test_fold = cfg.folds - 1
        inner, test = np.flatnonzero(fold != test_fold), np.flatnonzero(fold == test_fold)
        print(f"{len(inner)} images in {test_fold} inner folds, {len(test)} held-out images; {cfg.epochs} epochs")
        inner_cfg = cfg.model_copy(update={"folds": test_fold})
        arch, cnn = cfg.arch[0], paths.cnn(cfg.cnns[0])  # the lead CNN
        for k in range(test_fold):
            train_fold(k, inner_cfg, arch, images[inner], y[inner], fold[inner], cnn)
        members = [load_fold_model(cnn, arch, k) for k in range(test_fold)]
        refit = train_refit(inner_cfg, arch, images[inner], y[inner], np.arange(len(inner)))

        member_probs = [predict_probs(m, images[test], spec) for m in members]
        scores = {
            f"fold ensemble ({len(members)} models)": all_metrics(y[test], np.mean(member_probs, axis=0)),
            "one fold model (mean of the members)": {
                k: float(np.mean([all_metrics(y[test], q)[k] for q in member_probs])) for k in KEYS
            },
            "refit on all inner folds (1 model)": all_metrics(y[test], predict_probs(refit, images[test], spec)),
        }
        export_onnx(members, spec, images[test][:8], tmp / "ensemble.onnx", log=lambda m: None)
        export_onnx([refit], spec, images[test][:8], tmp / "one.onnx", log=lambda m: None)
        x = {b: to_model_input(images[test][:b], spec) for b in (1, 8)}
        speed = {
            name: {b: graph_images_per_s(tmp / f"{name}.onnx", x[b], rounds=20) for b in (1, 8)}
            for name in ("ensemble", "one")
        }

    print(f"\nheld-out lesions (fold {test_fold}), {len(test)} images:")
    print(f"{'':40s}" + "".join(f"{k:>16s}" for k in KEYS))
    for name, s in scores.items():
        print(f"{name:40s}" + "".join(f"{s[k]:16.4f}" for k in KEYS))
    for b in (1, 8):
        e, o = speed["ensemble"][b], speed["one"][b]
        print(f"CPU images/s at batch {b}: ensemble {e:.1f}, one model {o:.1f}, ratio {o / e:.2f}x")


if __name__ == "__main__":
    main()
