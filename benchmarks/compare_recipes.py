"""CNN recipes compared on the same lesion-grouped folds: out-of-fold metrics with intervals, each
recipe's paired difference against the first, per-class recall, and the learning curves.

Train each recipe's CNN stage (its lead CNN, the first --arch, is compared) into its own run directory (on one GPU the runs can go side by side,
or fold by fold with `--fold K`), then compare them:

    python -m training cnn --data-dir FULL --out runs/A --preset gpu
    python -m training cnn --data-dir FULL --out runs/B --preset gpu --epochs 40 --lr 2e-3 --weight-decay 0.05
    python -m benchmarks.compare_recipes runs/A runs/B [--bootstrap 1000]

The runs must hold the same images in the same folds (same data, `--folds` and `--seed`): their
folds.csv are compared first. Every figure is out-of-fold; the learning curve is each epoch's
validation BMCA averaged over the folds (from cnn/fold<k>.json), for seeing whether a recipe was
still improving when it stopped. Only the cnn stage is needed: the boosters and stack of the chosen
recipe then run with `python -m training run` on its directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from sklearn.metrics import recall_score

from benchmarks import machine_header
from service.core.labels import CLASSES
from training.cnn.loop import OLD_RULE, kept_best_epoch
from training.config import saved_config
from training.data.io import PROB_COLUMNS
from training.evaluation.metrics import with_intervals
from training.layout import RunLayout
from training.reporting.markdown import metrics_table
from training.run import Run


def load_run(run_dir: Path, data_dir: str | None) -> Run:
    cfg = saved_config(run_dir, data_dir=data_dir)
    paths = RunLayout(run_dir)
    lead = cfg.cnns[0]
    needed = [paths.oof(lead), *(paths.cnn(lead).fold_summary(k) for k in range(cfg.folds))]
    if missing := [str(p) for p in needed if not p.exists()]:
        raise SystemExit(f"{run_dir}: its cnn stage is not finished ({', '.join(missing)} missing)")
    return Run(cfg, run_dir, log=lambda m: None)


def settings_that_differ(runs: dict[str, Run]) -> dict[str, list]:
    prints = {name: r.cfg.fingerprint() for name, r in runs.items()}
    keys = sorted({k for p in prints.values() for k in p})
    return {k: [p.get(k) for p in prints.values()] for k in keys if len({repr(p.get(k)) for p in prints.values()}) > 1}


def learning_curve(run: Run) -> pd.Series:
    """Mean validation BMCA over the folds at each epoch (1, 2, ...)."""
    rows = [
        (h["epoch"], h["val_bmca"])
        for k in range(run.cfg.folds)
        for h in json.loads(run.paths.cnn(run.cfg.cnns[0]).fold_summary(k).read_text())["history"]
    ]
    return pd.DataFrame(rows, columns=["epoch", "bmca"]).groupby("epoch").bmca.mean()


def compare(run_dirs: list[Path], data_dir: str | None = None, bootstrap: int = 1000, seed: int = 0) -> str:
    """The comparison as markdown."""
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        raise SystemExit(f"give the runs distinct directory names: {', '.join(names)}")
    runs = {name: load_run(d, data_dir) for name, d in zip(names, run_dirs)}
    first, *others = names
    columns = ["image_id", "lesion_id", "fold"]  # not the calibration mark: the folds are what must agree
    folds = {name: pd.read_csv(r.paths.folds)[columns] for name, r in runs.items()}
    for name in others:
        if not folds[name].equals(folds[first]):
            raise SystemExit(f"{name} and {first} do not share their folds: same data, --folds and --seed needed")
    table = runs[first].table
    y, lesions = table.label.to_numpy(), table.lesion_id.to_numpy()
    oofs = {name: r.oof(r.cfg.cnns[0]) for name, r in runs.items()}
    for name in others:
        if not (oofs[name].image_id.to_numpy() == table.image_id.to_numpy()).all():
            raise SystemExit(
                f"{name} and {first} list their images in a different order: give both the same --data-dir"
            )
    probs = {name: oof[PROB_COLUMNS].to_numpy() for name, oof in oofs.items()}

    lines = [f"# CNN recipes on {len(y)} images, {runs[first].cfg.folds} lesion-grouped folds (out-of-fold)", ""]
    lines += ["| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    differ = settings_that_differ(runs)
    none = ["| (none differ) |" + " |" * len(names)]
    lines += [f"| {k} | " + " | ".join(map(str, v)) + " |" for k, v in differ.items()] or none
    old = [
        name
        for name, r in runs.items()
        if any(kept_best_epoch(r.paths.cnn(r.cfg.cnns[0]), k) for k in range(r.cfg.folds))
    ]
    if old:
        lines += ["", f"Note: {', '.join(old)} {OLD_RULE} (slightly optimistic against runs that kept the last)."]
    # the same seed draws the same lesion resamples in every call, so each difference is paired
    report = with_intervals(y, probs, lesions, bootstrap, seed, paired=(others[0], first) if others else ("", ""))
    lines += ["", *metrics_table(report)]
    for name in others[1:]:
        pair = with_intervals(y, {first: probs[first], name: probs[name]}, lesions, bootstrap, seed, (name, first))
        lines += ["", metrics_table(pair)[-1]]
    lines += ["", "Recall per class:", "", "| run | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for name, p in probs.items():
        recall = recall_score(y, p.argmax(1), labels=range(len(CLASSES)), average=None, zero_division=0)
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in recall) + " |")
    lines += ["", "Validation BMCA, mean over folds, by epoch:", ""]
    for name, r in runs.items():
        curve = learning_curve(r)
        shown = [e for e in curve.index if e % 5 == 0 or e == curve.index[-1]]
        lines.append(f"- {name}: " + ", ".join(f"epoch {e} {curve[e]:.3f}" for e in shown))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "runs", nargs="+", type=Path, help="run directories whose cnn stage is done; the first is the baseline"
    )
    p.add_argument("--data-dir", help="the runs' data, if it moved since (default: each run's config)")
    p.add_argument("--bootstrap", type=int, default=1000, help="lesion-bootstrap resamples for the intervals")
    args = p.parse_args()
    print(machine_header(), flush=True)
    print(compare(args.runs, args.data_dir, args.bootstrap))


if __name__ == "__main__":
    main()
