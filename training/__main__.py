"""Command line: `python -m training run|<stage>|evaluate|demo-data|download ...`.

Errors a user can cause print `error: ...` and exit 2. `demo-data`, `download`, `keygen` and `sign`
never import torch or onnxruntime: they run on a machine with only the serving and data packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from training.config import PRESETS, RunConfig
from training.errors import RunError
from training.pipeline import STAGE_NAMES

PRESET = "the preset's"  # the default shown for the settings a preset sets
RUN_OVERRIDES = [name for name in RunConfig.model_fields if name not in ("data_dir", "preset")]


def add_run_args(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, with its help, type, choices and default from the field; unset
    flags stay None, so the preset's values (or a resumed run's) apply."""
    p.add_argument("--data-dir", required=True, help=RunConfig.model_fields["data_dir"].description)
    p.add_argument("--out", required=True, type=Path, help="run directory (resumes if it exists)")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help=RunConfig.model_fields["preset"].description
    )
    for name in RUN_OVERRIDES:
        field = RunConfig.model_fields[name]
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        kind, options = field.annotation, get_args(field.annotation)
        default = (
            PRESET if any(name in preset for preset in PRESETS.values()) else extra.get("cli_default", field.default)
        )
        if isinstance(default, list):
            default = ",".join(map(str, default))
        kwargs: dict[str, Any] = {"help": f"{field.description} (default: {default})"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal or "cli_choices" in extra:
            kwargs["choices"] = extra.get("cli_choices", list(options))
        elif kind in (int, float):
            kwargs["type"] = kind
        p.add_argument("--" + name.replace("_", "-"), **kwargs)


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
    if args.command in ("demo-data", "download", "keygen", "evaluate", "run", *STAGE_NAMES):
        check_writable(args.out)
    if args.command == "demo-data":
        from training.data.synthetic import write_demo_dataset

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
        from training.data.download import DATAVERSE_URL, download_ham10000

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


def check_writable(folder: Path) -> None:
    """The run folder can be created and written by this user, or a RunError that says how to fix it
    (in a container: the image runs as uid 10001, and a bind-mounted folder is its host owner's)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        hint = ""
        if isinstance(exc, PermissionError):
            hint = (
                f"; this process runs as uid {uid}: give it the folder (chown), or in Docker run the image as its "
                'owner: docker run --user "$(id -u):$(id -g)" ...'
            )
        raise RunError(f"cannot write the run folder {folder}: {exc.strerror or exc}{hint}") from None


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
