"""Command line: `python -m training run|<stage>|demo-data|download ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.config import PRESETS, ConfigMismatch, make_config
from training.data import DataError
from training.pipeline import STAGES


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="HAM10000 metadata CSV + image folder(s)")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumes if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--folds", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, help="CNN input width; height is 3/4 of it")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weights", help="imagenet | none | PATH to a resnet18 state dict (default none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers (default 2)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for metric intervals")
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default="bf16", help="training autocast (eval is always fp32)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("run", help="every stage, skipping finished ones"))
    for stage in STAGES:
        add_run_args(sub.add_parser(stage, help=f"only the {stage} stage (earlier stages must be done)"))
    demo = sub.add_parser("demo-data", help="write the synthetic demo dataset")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--images", type=int, default=700)
    demo.add_argument("--seed", type=int, default=0)
    dl = sub.add_parser("download", help="download HAM10000 from Harvard Dataverse, checksums verified")
    dl.add_argument("--out", required=True, type=Path)
    dl.add_argument("--base-url", default=None, help="Dataverse server (default https://dataverse.harvard.edu)")
    args = parser.parse_args(argv)

    from training.download import DownloadError
    from training.export import ExportError
    from training.models import WeightsError

    try:
        if args.command == "demo-data":
            from training.synthetic import write_demo_dataset

            write_demo_dataset(args.out, n_images=args.images, seed=args.seed)
            print(f"wrote a synthetic dataset of {args.images} images to {args.out}")
        elif args.command == "download":
            from training.download import DATAVERSE_URL, download_ham10000

            download_ham10000(args.out, base_url=args.base_url or DATAVERSE_URL)
        else:
            from training.pipeline import run_pipeline

            overrides = {
                k: getattr(args, k)
                for k in (
                    "folds",
                    "epochs",
                    "image_size",
                    "batch_size",
                    "lr",
                    "weights",
                    "seed",
                    "workers",
                    "bootstrap",
                )
            }
            cfg = make_config(args.preset, args.data_dir, **overrides)
            stages = STAGES if args.command == "run" else [args.command]
            run_pipeline(cfg, args.out, stages, precision=args.precision)
            print(f"done: {args.out}")
    except (DataError, ConfigMismatch, WeightsError, DownloadError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
