"""Run configuration: presets plus command-line overrides, saved in RUN_DIR/config.json.

Also the names of the models a run trains: the CNN, the chosen boosters, the soft vote and
the stack. The bundle's manifest carries this roster to the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from service.core.preprocess import ImageSpec
from training.errors import ConfigMismatch
from training.io import atomic_write_text

CNN, SOFT_VOTE, STACK = "cnn", "soft_vote", "stack"
FP32_GRAPH, INT8_GRAPH = "cnn.onnx", "cnn.int8.onnx"  # the CNN's graphs, same names in RUN_DIR/cnn/ and the bundle
ALL_BOOSTERS = ["xgboost", "lightgbm", "catboost"]  # training.boosters.BOOSTERS implements each

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
    folds: int = Field(5, ge=3, description="at least 3: each booster picks its rounds on an inner fold")
    epochs: int = 10
    image_size: int = 128  # width; height is 3/4 of it (HAM10000's aspect ratio)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = Field(1e-4, ge=0)  # AdamW's
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    weights: str = "none"  # imagenet | none | PATH
    precision: Literal["bf16", "fp32"] = "bf16"  # training autocast; evaluation is always fp32
    boosters: list[str] = ALL_BOOSTERS
    served_cnn: Literal["ensemble", "refit"] = "refit"  # see `--served-cnn` and README "Which CNN is served"
    int8: bool = True  # quantize the CNN; the bundle serves int8 only if it passes its out-of-fold gate
    tta: bool = False  # average the CNN over the 8 dihedral flips: validation, OOF and the served graph (8x cost)
    ood_method: Literal["mahalanobis", "energy"] = "mahalanobis"  # the out-of-distribution score served
    ood_share: float = Field(0.05, gt=0, lt=1)  # share of held-out real images its threshold flags
    prior: Literal["balanced", "training"] = "balanced"  # the served probabilities' default class prior
    keep_fp32: bool = False  # also bundle the fp32 graph beside an int8 one (serving can then pick it)
    booster_rounds: int = 600
    bootstrap: int = 200
    seed: int = 42
    compile: bool = False  # torch.compile the CNN while training: same model, faster steps on a GPU

    @field_validator("boosters", mode="before")
    @classmethod
    def _known_boosters(cls, v: object) -> list[str]:
        names = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)  # type: ignore[call-overload]
        unknown = [n for n in names if n not in ALL_BOOSTERS]
        if unknown or not names:
            raise ValueError(
                f"boosters must be a non-empty subset of {', '.join(ALL_BOOSTERS)}; got {unknown or names}"
            )
        return [b for b in ALL_BOOSTERS if b in names]  # one canonical order

    @property
    def image_height(self) -> int:
        return self.image_size * 3 // 4

    def image_spec(self) -> ImageSpec:
        """The CNN's input size and normalisation, as the bundle's manifest records it."""
        return ImageSpec(width=self.image_size, height=self.image_height)

    @property
    def level1(self) -> list[str]:
        """Models the soft vote averages and the stack stacks, in order."""
        return [CNN, *self.boosters]

    @property
    def components(self) -> list[str]:
        """Every model with out-of-fold predictions and a report row."""
        return [*self.level1, SOFT_VOTE, STACK]

    def fingerprint(self) -> dict:
        """Settings that change results: a resumed run must agree on them."""
        return self.model_dump(exclude={"compile", "data_dir", "bootstrap", "keep_fp32"})


def native_precision() -> str:
    """bf16 where the hardware computes it natively (CUDA, or a CPU with AVX-512-BF16 or AMX), else fp32.

    Emulated bf16 is slow: on an AVX2-only CPU a bf16 training step measured about 10x slower than
    fp32, while an AVX-512-BF16 CPU ran bf16 1.9x faster (`python -m benchmarks.bench_precision`)."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private helpers of torch.cpu
    return "bf16" if any(getattr(torch.cpu, c, lambda: False)() for c in checks) else "fp32"


def make_config(preset: str, data_dir: str, **overrides) -> RunConfig:
    """A preset plus explicit overrides; precision "auto" (or none given) becomes `native_precision()`."""
    values = dict(PRESETS[preset], preset=preset, data_dir=str(data_dir))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("precision", "auto") == "auto":
        values["precision"] = native_precision()
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        e = exc.errors()[0]
        option = "--" + "-".join(str(p) for p in e["loc"]).replace("_", "-")
        raise ConfigMismatch(f"{option}: {e['msg'].removeprefix('Value error, ')}") from None


def saved_config(run_dir: Path, **overrides) -> RunConfig:
    """RUN_DIR/config.json as written by its run (settings added since take what older runs did)."""
    saved = json.loads((run_dir / "config.json").read_text())
    saved.setdefault("served_cnn", "ensemble")
    saved.setdefault("int8", False)
    return RunConfig(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})


def save_or_check(cfg: RunConfig, run_dir: Path) -> None:
    """First run writes config.json; a resumed run must use the same result-changing settings."""
    path = run_dir / "config.json"
    if path.exists():
        old = saved_config(run_dir)
        new = cfg.fingerprint()
        diff = {k: (v, new[k]) for k, v in old.fingerprint().items() if new[k] != v}
        if diff:
            changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            raise ConfigMismatch(f"{run_dir} was started with different settings ({changes}); use a new --out")
    atomic_write_text(path, cfg.model_dump_json(indent=2))
