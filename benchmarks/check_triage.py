"""Do a bundle's triage promises hold on lesions its run never saw? (`python -m benchmarks.check_triage`)

Splits a HAM10000-layout dataset by lesion (a seeded share held out), trains a run on the rest
(`python -m training run`, resumable in --out), then scores the held-out lesions with
`python -m training evaluate` and prints, for each operating point, the sensitivity and specificity
promised beside those achieved on the held-out images, with their intervals.

  python -m benchmarks.check_triage --data-dir ../shared/data/ham10000 --out /tmp/triage --preset smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import machine_header
from training.data.ham10000 import load_dataset


def split(data_dir: Path, out: Path, holdout: float, seed: int) -> tuple[Path, Path]:
    """Two HAM10000-layout folders (links to the images): the training lesions and the held-out ones."""
    table = load_dataset(data_dir, log=lambda m: None).table
    lesions = table.lesion_id.unique()
    held = set(np.random.default_rng(seed).choice(lesions, int(holdout * len(lesions)), replace=False))
    folders = []
    for name, rows in (("train", table[~table.lesion_id.isin(held)]), ("holdout", table[table.lesion_id.isin(held)])):
        folder = out / name
        if not (folder / "HAM10000_metadata.csv").exists():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            for path in rows.path:
                target = folder / "images" / Path(path).name
                if not target.exists():
                    target.symlink_to(Path(path).resolve())
            columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
            rows[[c for c in columns if c in rows]].to_csv(folder / "HAM10000_metadata.csv", index=False)
        folders.append(folder)
    shutil.rmtree(out / "evaluation", ignore_errors=True)
    return folders[0], folders[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder for the split, the run and the evaluation")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--holdout", type=float, default=0.3, help="share of lesions held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=500)
    args, extra = p.parse_known_args(argv)  # the rest goes to `training run`
    print(machine_header())
    train, holdout = split(args.data_dir, args.out, args.holdout, args.seed)
    run = args.out / "run"
    python = [sys.executable, "-m", "training"]
    subprocess.run(
        [*python, "run", "--data-dir", str(train), "--out", str(run), "--preset", args.preset, *extra], check=True
    )
    evaluation = args.out / "evaluation"
    subprocess.run(
        [*python, "evaluate", "--bundle", str(run / "bundle"), "--data-dir", str(holdout), "--out", str(evaluation)]
        + ["--bootstrap", str(args.bootstrap)],
        check=True,
        capture_output=True,
    )
    report = json.loads((evaluation / "report.json").read_text())
    held = pd.read_csv(holdout / "HAM10000_metadata.csv")
    print(f"held out: {len(held)} images of {held.lesion_id.nunique()} lesions; trained on the rest ({args.preset})")
    for level, rows in report["triage"].items():
        for r in rows:
            s, sp = r["sensitivity"], r["specificity"]
            print(
                f"{level:<8} {r['point']:<17} sensitivity promised {s['promised']:.3f} [{s['promised_ci95'][0]:.3f}, {s['promised_ci95'][1]:.3f}], "
                f"held out {s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]; specificity promised "
                f"{sp['promised']:.3f}, held out {sp['value']:.3f} [{sp['ci95'][0]:.3f}, {sp['ci95'][1]:.3f}]; "
                f"{'holds' if r['holds'] else 'DOES NOT HOLD'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
