"""Run configuration: presets plus command-line overrides, saved in RUN_DIR/config.json.

Also the names of the models a run trains: the CNN, the chosen boosters, the soft vote and
the stack. The bundle's manifest carries this roster to the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from service.core.preprocess import ImageSpec
from training.data.io import atomic_write_text
from training.errors import ConfigMismatch

CNN, SOFT_VOTE, STACK = "cnn", "soft_vote", "stack"
ALL_BOOSTERS = ["xgboost", "lightgbm", "catboost"]  # training.ensemble.boosters.BOOSTERS implements each
ALL_ARCHS = ["resnet18", "efficientnet_lite0"]  # training.cnn.models builds each
DEFAULT_ARCHS = ["resnet18", "efficientnet_lite0"]  # the first (the lead) draws heatmaps and scores OOD


def cnn_name(arch: str) -> str:
    """A CNN's name in the roster, responses and files: `cnn` for the ResNet-18 (the name every
    bundle has used for it), `cnn_<arch>` for the others."""
    return CNN if arch == "resnet18" else f"{CNN}_{arch}"


def graph_files(name: str) -> tuple[str, str]:
    """A CNN's fp32 and int8 graph files: the same names in its run folder and in the bundle."""
    return f"{name}.onnx", f"{name}.int8.onnx"


PRESETS: dict[str, dict] = {
    # a few minutes on the 2,118-image sample on 2 CPU cores: for tests, proves the plumbing
    "smoke": dict(folds=3, epochs=1, image_size=64, batch_size=64, lr=2e-3, booster_rounds=60, bootstrap=30),
    # the realistic CPU recipe: EfficientNet-Lite0 fine-tuned (backbone at 0.25x the head's lr) beside
    # the ResNet-18 from scratch (python -m benchmarks.compare_finetuning, docs/results.md)
    "cpu": dict(folds=5, epochs=8, image_size=128, batch_size=64, lr=2e-3, booster_rounds=600, bootstrap=200),
    # a CUDA machine: larger images, more epochs
    "gpu": dict(folds=5, epochs=25, image_size=256, batch_size=128, lr=1e-3, booster_rounds=1000, bootstrap=1000),
}


class RunConfig(BaseModel):
    """Every setting of a run, each declared once: its type, default and help text here; the command
    line's flags (`--image-size` for image_size) are generated from these fields (training/__main__.py)."""

    data_dir: str = Field(description="HAM10000 metadata CSV + image folder(s)")
    preset: str = Field("cpu", description="smoke | cpu | gpu: the defaults of folds, epochs, sizes and rounds")
    folds: int = Field(
        5, ge=3, description="lesion-grouped folds; at least 3: each booster picks its rounds on an inner fold"
    )
    epochs: int = Field(10, ge=1, description="CNN training epochs per fold")
    image_size: int = Field(128, ge=32, description="CNN input width; height is 3/4 of it (HAM10000's aspect ratio)")
    batch_size: int = Field(64, ge=1, description="CNN training batch size")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    label_smoothing: float = Field(0.05, ge=0, lt=1, description="cross-entropy label smoothing")
    arch: list[str] = Field(
        DEFAULT_ARCHS,
        description=f"comma-separated CNNs from {','.join(ALL_ARCHS)}, each trained per fold and feeding the boosters, "
        "soft vote and stack; the first draws the heatmaps and scores out-of-distribution images",
    )
    weights: str = Field(
        "auto",
        description="auto (ImageNet where it installs offline: efficientnet_lite0; resnet18 from scratch) | "
        "imagenet (resnet18: torchvision's download) | none | PATH to a state dict (one --arch)",
    )
    backbone_lr_scale: float = Field(
        0.25, gt=0, le=1, description="a pretrained CNN's backbone learns at lr times this, its new head at lr"
    )
    freeze_stages: int = Field(
        0, ge=0, description="a pretrained CNN's first stages kept frozen (no backward pass through them)"
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="training autocast; auto: bf16 where the hardware has it natively, else fp32. Evaluation is fp32",
        json_schema_extra={"cli_choices": ["auto", "bf16", "fp32"], "cli_default": "auto"},
    )
    boosters: list[str] = Field(ALL_BOOSTERS, description=f"comma-separated subset of {','.join(ALL_BOOSTERS)}")
    served_cnn: Literal["ensemble", "refit"] = Field(
        "refit",
        description="the CNN the bundle serves: one model refit on every row but the calibration lesions with the folds' recipe, or the fold "
        "models averaged (folds x the cost; as accurate on held-out lesions: python -m benchmarks.compare_served_cnn)",
    )
    calibration_share: float = Field(
        0.2,
        ge=0,
        le=0.5,
        description="share of lesions (dx-stratified; about: one split of round(1/share)) held out of the refit CNN, "
        "boosters and meta-learner, on which the triage thresholds are chosen through the served graphs, so a point "
        "promises what the bundle it ships in gives on images it never trained on; 0 (the default with --served-cnn "
        "ensemble): every row refits, and the points are the fold models' out-of-fold figures",
    )
    served: str = Field(
        "auto",
        description="the combiner the bundle serves: auto (the out-of-fold rule chooses among the soft vote, the "
        "stack and each booster: docs/training.md), or one of soft_vote, stack, cnn or a booster",
    )
    int8: bool = Field(True, description="quantize the CNN to int8, served only if it passes its out-of-fold gate")
    tta: bool = Field(
        False,
        description="test-time augmentation: the CNN averaged over the 8 flips/transposes of each image in "
        "validation, out-of-fold predictions and the served graph (8x the CNN's cost)",
    )
    ood_method: Literal["mahalanobis", "energy"] = Field(
        "mahalanobis",
        description="the CNN's out-of-distribution score the bundle serves (python -m benchmarks.bench_ood)",
    )
    ood_share: float = Field(
        0.05, gt=0, lt=1, description="share of held-out real images the OOD flag fires on (its checks together)"
    )
    prior: Literal["balanced", "training"] = Field(
        "balanced",
        description="the class prior of the served probabilities unless a request names one: balanced (as trained) "
        "or training (the training data's class shares)",
    )
    keep_fp32: bool = Field(False, description="bundle the fp32 CNN beside the int8 one (serving can then pick it)")
    triage: list[float] = Field(
        [0.90, 0.95, 0.98],
        description="comma-separated target sensitivities for malignancy: each a triage operating point whose "
        "threshold is chosen on the served answer for the calibration lesions, nested by fold (refer when its "
        "malignant probability reaches it)",
    )
    triage_default: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="the triage point an answer uses unless the request names another (one of --triage)",
    )
    booster_rounds: int = Field(
        600, ge=1, description="most boosting rounds (each booster picks its own on an inner fold)"
    )
    bootstrap: int = Field(200, ge=1, description="lesion-bootstrap resamples for metric intervals")
    seed: int = Field(42, description="random seed of folds, training and bootstrap")
    compile: bool = Field(False, description="torch.compile the CNN while training: same model, faster steps on a GPU")

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

    @field_validator("arch", mode="before")
    @classmethod
    def _known_archs(cls, v: object) -> list[str]:
        names = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)  # type: ignore[call-overload]
        unknown = [n for n in names if n not in ALL_ARCHS]
        if unknown or not names or len(set(names)) < len(names):
            raise ValueError(f"arch must list distinct CNNs from {', '.join(ALL_ARCHS)}; got {names}")
        return names  # in the order given: the first is the lead CNN

    @field_validator("triage", mode="before")
    @classmethod
    def _sensitivities(cls, v: object) -> list[float]:
        try:
            targets = sorted({float(s) for s in (v.split(",") if isinstance(v, str) else v)})  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            targets = []
        if not targets or not all(0 < t < 1 for t in targets):
            raise ValueError(f"triage must list target sensitivities between 0 and 1, such as 0.9,0.95; got {v!r}")
        return targets

    @model_validator(mode="after")
    def _default_is_a_target(self) -> RunConfig:
        if self.triage_default not in self.triage:
            raise ValueError(f"triage_default {self.triage_default} must be one of the --triage targets {self.triage}")
        return self

    @model_validator(mode="after")
    def _calibration_needs_refit(self) -> RunConfig:
        if self.calibration_share > 0 and self.served_cnn != "refit":
            if "calibration_share" not in self.model_fields_set:  # the default follows the served CNN
                self.calibration_share = 0.0
                return self
            raise ValueError(
                "--calibration-share must be 0 with --served-cnn ensemble: the fold models saw every image, so none "
                "is left to choose the triage thresholds on"
            )
        return self

    @field_validator("weights")
    @classmethod
    def _weights_fit_archs(cls, v: str, info: ValidationInfo) -> str:
        if v not in ("auto", "imagenet", "none") and len(info.data.get("arch", [])) > 1:
            raise ValueError("a weights file fits one architecture: give one --arch with it")
        return v

    @field_validator("served")
    @classmethod
    def _known_served(cls, v: str, info: ValidationInfo) -> str:
        names = [*map(cnn_name, info.data.get("arch", [])), *info.data.get("boosters", []), SOFT_VOTE, STACK]
        if v != "auto" and v not in names:
            raise ValueError(f"the served combiner must be auto or one of {', '.join(names)}; got {v!r}")
        return v

    @property
    def serving_candidates(self) -> list[str]:
        """What `served auto` chooses among, in the order ties fall back to."""
        return [SOFT_VOTE, STACK, *self.boosters]

    @property
    def image_height(self) -> int:
        return self.image_size * 3 // 4

    def image_spec(self) -> ImageSpec:
        """The CNN's input size and normalisation, as the bundle's manifest records it."""
        return ImageSpec(width=self.image_size, height=self.image_height)

    @property
    def cnns(self) -> list[str]:
        """The CNNs' names, in `arch` order: the first is the lead (heatmaps, OOD score)."""
        return [cnn_name(a) for a in self.arch]

    @property
    def level1(self) -> list[str]:
        """Models the soft vote averages and the stack stacks, in order."""
        return [*self.cnns, *self.boosters]

    @property
    def components(self) -> list[str]:
        """Every model with out-of-fold predictions and a report row."""
        return [*self.level1, SOFT_VOTE, STACK]

    def fingerprint(self) -> dict:
        """Settings that change results: a resumed run must agree on them."""
        return self.model_dump(exclude={"compile", "data_dir", "bootstrap", "keep_fp32", "served"})


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
        message = e["msg"].removeprefix("Value error, ")
        option = "--" + "-".join(str(p) for p in e["loc"]).replace("_", "-")
        raise ConfigMismatch(f"{option}: {message}" if e["loc"] else message) from None


def saved_config(run_dir: Path, **overrides) -> RunConfig:
    """RUN_DIR/config.json as written by its run (settings added since take what older runs did)."""
    saved = json.loads((run_dir / "config.json").read_text())
    saved.setdefault("served_cnn", "ensemble")
    saved.setdefault("int8", False)
    saved.setdefault("arch", ["resnet18"])  # runs before the backbone choice trained a ResNet-18 alone
    saved.setdefault("weights", "none")
    saved.setdefault("calibration_share", 0.0)  # runs before it refit on every row
    try:
        return RunConfig(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ConfigMismatch(
            f"{run_dir / 'config.json'}: {'.'.join(map(str, e['loc']))}: {e['msg']}; use a new --out"
        ) from None


def flag(key: str, value: object) -> str:
    """The command-line flag that sets `key` to `value` (--calibration-share 0.0, --no-int8, --arch a,b)."""
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else "--no-" + key.replace("_", "-")
    return f"{name} {','.join(map(str, value)) if isinstance(value, list) else value}"


def save_or_check(cfg: RunConfig, run_dir: Path) -> None:
    """First run writes config.json; a resumed run must use the same result-changing settings."""
    path = run_dir / "config.json"
    if path.exists():
        old = saved_config(run_dir)
        new = cfg.fingerprint()
        diff = {k: (v, new[k]) for k, v in old.fingerprint().items() if new[k] != v}
        if diff:
            changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            resume = " ".join(flag(k, a) for k, (a, _) in diff.items())
            raise ConfigMismatch(
                f"{run_dir} was started with different settings ({changes}); resume it with {resume}, or use a new --out"
            )
    atomic_write_text(path, cfg.model_dump_json(indent=2))
