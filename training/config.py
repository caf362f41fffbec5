"""Run configuration: presets plus command-line overrides, saved in RUN_DIR/config.json."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from training.io import atomic_write_text

PRESETS: dict[str, dict] = {
    # about a minute on the 2,118-image sample on 2 CPU cores: for tests, proves the plumbing
    "smoke": dict(folds=3, epochs=2, image_size=64, batch_size=64, lr=2e-3, booster_rounds=60, bootstrap=30),
    # the realistic CPU recipe (from-scratch or ImageNet weights)
    "cpu": dict(folds=5, epochs=8, image_size=128, batch_size=64, lr=2e-3, booster_rounds=600, bootstrap=200),
    # a CUDA machine: larger images, more epochs
    "gpu": dict(folds=5, epochs=25, image_size=256, batch_size=128, lr=1e-3, booster_rounds=1000, bootstrap=1000),
}


class RunConfig(BaseModel):
    data_dir: str
    preset: str = "cpu"
    folds: int = 5
    epochs: int = 10
    image_size: int = 128  # width; height is 3/4 of it (HAM10000's aspect ratio)
    batch_size: int = 64
    lr: float = 2e-3
    weights: str = "none"  # imagenet | none | PATH
    booster_rounds: int = 600
    bootstrap: int = 200
    seed: int = 42
    workers: int = 2

    @property
    def image_height(self) -> int:
        return self.image_size * 3 // 4

    # settings that change results: a resumed run must agree on them
    def fingerprint(self) -> dict:
        return self.model_dump(exclude={"workers", "data_dir", "bootstrap"})


def make_config(preset: str, data_dir: str, **overrides) -> RunConfig:
    values = dict(PRESETS[preset], preset=preset, data_dir=str(data_dir))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**values)


class ConfigMismatch(ValueError):
    """The run directory and the command disagree (settings, or stages run out of order)."""


def save_or_check(cfg: RunConfig, run_dir: Path) -> None:
    """First run writes config.json; a resumed run must use the same result-changing settings."""
    path = run_dir / "config.json"
    if path.exists():
        old = RunConfig(**json.loads(path.read_text()))
        new = cfg.fingerprint()
        diff = {k: (v, new[k]) for k, v in old.fingerprint().items() if new[k] != v}
        if diff:
            changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            raise ConfigMismatch(f"{run_dir} was started with different settings ({changes}); use a new --out")
    atomic_write_text(path, cfg.model_dump_json(indent=2))
