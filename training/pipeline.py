"""The stages of a training run, in order (training/stages/, one module each). Each skips itself
when its outputs exist in RUN_DIR (training/layout.py names every path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from training.config import RunConfig, save_or_check
from training.errors import ConfigMismatch
from training.run import Run
from training.stages import baseline, boosters, bundle, cnn, export, folds, quantize, report, select, stack, triage


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType  # its outputs(run) and run(run)
    needs: tuple[str, ...] = ()  # stages whose outputs it reads (folds are made on demand)
    reads: tuple[str, ...] = ()  # stages whose outputs it reads when they exist

    def outputs(self, run: Run) -> list[Path]:
        return self.module.outputs(run)

    @property
    def run(self) -> Callable[[Run], None]:
        return self.module.run


STAGES: list[Stage] = [
    Stage("folds", folds),
    Stage("cnn", cnn),
    Stage("export", export, needs=("cnn",)),
    Stage("boosters", boosters, needs=("cnn",)),
    Stage("stack", stack, needs=("cnn", "boosters")),
    Stage("select", select, needs=("cnn", "boosters", "stack")),
    Stage("quantize", quantize, needs=("cnn", "export", "boosters", "stack", "select")),
    Stage("baseline", baseline, needs=("cnn", "boosters", "stack", "select"), reads=("quantize",)),
    Stage("triage", triage, needs=("export", "boosters", "stack", "select", "baseline"), reads=("quantize",)),
    Stage("report", report, needs=("cnn", "boosters", "stack", "select"), reads=("quantize", "triage")),
    Stage(
        "bundle",
        bundle,
        needs=("cnn", "export", "boosters", "stack", "select", "quantize", "baseline", "triage", "report"),
    ),
]
STAGE_NAMES = [s.name for s in STAGES]


def stage_done(run: Run, stage: Stage) -> bool:
    return all(p.exists() for p in stage.outputs(run))


def run_pipeline(cfg: RunConfig, run_dir: Path, stages: list[str], log=print, fold: int | None = None) -> Run:
    """Run the named stages in order, skipping finished ones; the stages they need must be done or named.
    A finished stage runs again when a stage it reads ran in this invocation (say, the boosters of an
    older run rerun to write their fold models: the quantize, report and bundle stages follow).

    The out-of-fold stages (boosters, stack, select, report) need the CNN's OOF rows but not its export, so the
    CNN stage can run on a GPU machine and the rest wherever the run directory is copied."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_or_check(cfg, run_dir)
    run = Run(cfg, run_dir, log, fold)
    by_name = {s.name: s for s in STAGES}
    for name in stages:
        missing = [n for n in by_name[name].needs if n not in stages and not stage_done(run, by_name[n])]
        if missing:
            raise ConfigMismatch(f"stage {name} needs {', '.join(missing)} first; run `python -m training run` instead")
    ran: set[str] = set()
    for stage in (s for s in STAGES if s.name in stages):
        if not stage.outputs(run):  # nothing to make with these settings (quantize with --no-int8)
            continue
        stale = sorted(set(stage.needs + stage.reads) & ran)
        if stage_done(run, stage) and not stale:
            log(f"[{stage.name}] already done in {run_dir}, skipping")
            continue
        if stale and stage_done(run, stage):  # what it read was just rewritten: its outputs describe older models
            log(f"[{stage.name}] running again: {', '.join(stale)} ran in this invocation")
            for path in stage.outputs(run):
                path.unlink(missing_ok=True)
        else:
            log(f"[{stage.name}] running")
        stage.run(run)
        ran.add(stage.name)
    return run
