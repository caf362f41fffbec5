"""Command line: `python -m training run|<stage>|evaluate|demo-data|download ...`.

Errors a user can cause print `error: ...` and exit 2. `demo-data`, `download`, `keygen` and `sign`
never import torch or onnxruntime: they run on a machine with only the serving and data packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.config import ALL_BOOSTERS, PRESETS
from training.errors import RunError
from training.pipeline import STAGE_NAMES

RUN_OVERRIDES = [
    "folds",
    "epochs",
    "image_size",
    "batch_size",
    "lr",
    "weight_decay",
    "label_smoothing",
    "weights",
    "precision",
    "boosters",
    "seed",
]
RUN_OVERRIDES += ["compile", "bootstrap", "served_cnn", "int8", "keep_fp32", "tta", "ood_method", "ood_share", "prior"]


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="HAM10000 metadata CSV + image folder(s)")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumes if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--folds", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, help="CNN input width; height is 3/4 of it")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0.05)")
    p.add_argument("--weights", help="imagenet | none | PATH to a resnet18 state dict (default none)")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="training autocast; auto (default): bf16 where the hardware has it natively, else fp32. Eval is fp32",
    )
    p.add_argument("--boosters", help=f"comma-separated subset of {','.join(ALL_BOOSTERS)} (default: all)")
    p.add_argument(
        "--served-cnn",
        choices=["ensemble", "refit"],
        help="the CNN the bundle serves: one model refit on every row with the folds' recipe (default), or the "
        "fold models averaged (folds x the cost; as accurate on held-out lesions: python -m benchmarks.compare_served_cnn)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        help="quantize the CNN to int8, served only if it passes its out-of-fold gate (default on)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test-time augmentation: the CNN averaged over the 8 flips/transposes of each image in validation, "
        "out-of-fold predictions and the served graph (8x the CNN's cost; default off)",
    )
    p.add_argument(
        "--ood-method",
        choices=["mahalanobis", "energy"],
        help="the out-of-distribution score the bundle serves (default mahalanobis: python -m benchmarks.bench_ood)",
    )
    p.add_argument("--ood-share", type=float, help="share of held-out real images the OOD flag fires on (default 0.05)")
    p.add_argument(
        "--prior",
        choices=["balanced", "training"],
        help="the class prior of the served probabilities unless a request names one: balanced (as trained, the "
        "default) or training (the training data's class shares)",
    )
    p.add_argument("--keep-fp32", action="store_true", default=None, help="bundle the fp32 CNN beside the int8 one")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the CNN for training (GPU)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for metric intervals")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("run", help="every stage, skipping finished ones"))
    for stage in STAGE_NAMES:
        stage_parser = sub.add_parser(stage, help=f"only the {stage} stage (the stages it reads must be done)")
        add_run_args(stage_parser)
        if stage == "cnn":
            stage_parser.add_argument(
                "--fold",
                type=int,
                help="train only this fold (one process or pod per fold, same --out); the last fold to finish "
                "writes the out-of-fold table",
            )
    demo = sub.add_parser("demo-data", help="write the synthetic demo dataset")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--images", type=int, default=700)
    demo.add_argument("--seed", type=int, default=0)
    dl = sub.add_parser("download", help="download HAM10000 from Harvard Dataverse, checksums verified")
    dl.add_argument("--out", required=True, type=Path)
    dl.add_argument("--base-url", default=None, help="Dataverse server (default https://dataverse.harvard.edu)")
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    keygen.add_argument("--out", required=True, type=Path, help="folder for bundle-signing.key and .pub")
    ev = sub.add_parser("evaluate", help="score a bundle on labelled HAM10000-layout data (external validation)")
    ev.add_argument("--bundle", required=True, type=Path)
    ev.add_argument("--data-dir", required=True, type=Path, help="HAM10000 metadata CSV + image folder(s), with dx")
    ev.add_argument("--out", required=True, type=Path, help="folder for report.{json,md}, predictions.csv, plots/")
    ev.add_argument("--bootstrap", type=int, default=1000, help="lesion-bootstrap resamples for the intervals")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--include-overlap",
        action="store_true",
        help="keep images the bundle trained on (same image_id or lesion_id) in the figures (default: left out)",
    )
    sign = sub.add_parser("sign", help="sign a bundle (manifest.sig) with a private key from keygen")
    sign.add_argument("--bundle", required=True, type=Path)
    sign.add_argument("--key", required=True, type=Path, help="bundle-signing.key")
    return parser


def dispatch(args: argparse.Namespace) -> None:
    if args.command == "demo-data":
        from training.synthetic import write_demo_dataset

        write_demo_dataset(args.out, n_images=args.images, seed=args.seed)
        print(f"wrote a synthetic dataset of {args.images} images to {args.out}")
    elif args.command == "keygen":
        from service.core.signing import generate_keypair

        private, public = generate_keypair(args.out)
        print(f"wrote {private} (keep it secret) and {public} (give it to the service as LESION_PUBLIC_KEY)")
    elif args.command == "sign":
        from service.core.bundle import BundleError
        from service.core.signing import sign_bundle

        try:
            print(f"wrote {sign_bundle(args.bundle, args.key.read_bytes())}")
        except (BundleError, OSError, ValueError) as exc:
            raise RunError(f"cannot sign {args.bundle}: {exc}") from None
    elif args.command == "evaluate":
        from service.core.bundle import BundleError
        from training.evaluate import evaluate_bundle

        try:
            evaluate_bundle(args.bundle, args.data_dir, args.out, args.bootstrap, args.seed, args.include_overlap)
        except BundleError as exc:
            raise RunError(f"cannot evaluate {args.bundle}: {exc}") from None
    elif args.command == "download":
        from training.download import DATAVERSE_URL, download_ham10000

        download_ham10000(args.out, base_url=args.base_url or DATAVERSE_URL)
    else:
        from training.config import make_config
        from training.pipeline import run_pipeline

        cfg = make_config(args.preset, args.data_dir, **{k: getattr(args, k) for k in RUN_OVERRIDES})
        stages = STAGE_NAMES if args.command == "run" else [args.command]
        fold = getattr(args, "fold", None)
        if fold is not None and not 0 <= fold < cfg.folds:
            raise RunError(f"--fold {fold}: this run has folds 0 to {cfg.folds - 1}")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and stages != ["cnn"]:
            raise RunError("torchrun trains the cnn stage only: torchrun ... -m training cnn ...; run the rest once")
        run_pipeline(cfg, args.out, stages, fold=fold)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"done: {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dispatch(args)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
