"""Every path of a run folder, named once. Stages, reports and benchmarks ask the layout; none
spells a path itself.

RUN_DIR/
  config.json                  settings (a resumed run must match them)
  artifacts/folds.csv          image_id, lesion_id, fold: read by every later stage
  artifacts/oof_<model>.csv    image_id, fold, p_<class>...: out-of-fold probabilities
  artifacts/oof_ood.csv        each out-of-distribution score, held out
  artifacts/selection-<served>.json   the served combiner and the lesion rule, chosen out-of-fold
                               (<served>: the --served the run asked for, auto by default)
  artifacts/report.{json,md}, artifacts/plots/*.png, artifacts/reference_predictions.json
  artifacts/ood.json           the out-of-distribution checks' out-of-fold thresholds (lead CNN)
  <cnn>/                       one folder per CNN, named as the roster names it (cnn: the ResNet-18,
                               cnn_efficientnet_lite0, ...):
  <cnn>/fold<k>.{pt,json}, <cnn>/oof_fold<k>.csv   fold models, their histories, their held-out rows
  <cnn>/refit.pt, <cnn>/<cnn>.onnx   the served CNN (refit on all rows but the calibration lesions, or the fold ensemble) in ONNX
  <cnn>/<cnn>.int8.onnx, <cnn>/quantization.json   the int8 graph and its out-of-fold gate
  models/<name>.pkl            level-2 models refit on all rows but the calibration lesions
  models/fold<k>/<name>.pkl    level-2 models of outer fold k (trained without it): the int8 gate's
                               served pipeline, out-of-fold
  bundle/                      what the service loads, and nothing else
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.config import graph_files


@dataclass(frozen=True)
class RunLayout:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    @property
    def folds(self) -> Path:
        return self.artifacts / "folds.csv"

    def oof(self, model: str) -> Path:
        return self.artifacts / f"oof_{model}.csv"

    def selection(self, served: str) -> Path:
        return self.artifacts / f"selection-{served}.json"

    @property
    def report_json(self) -> Path:
        return self.artifacts / "report.json"

    @property
    def report_md(self) -> Path:
        return self.artifacts / "report.md"

    @property
    def plots(self) -> Path:
        return self.artifacts / "plots"

    @property
    def reference_predictions(self) -> Path:
        return self.artifacts / "reference_predictions.json"

    def cnn(self, name: str) -> CnnLayout:
        """The folder of the CNN `name` (training.config.cnn_name)."""
        return CnnLayout(self.dir / name, name)

    @property
    def ood_spec(self) -> Path:
        return self.artifacts / "ood.json"

    @property
    def triage(self) -> Path:
        return self.artifacts / "triage.json"

    @property
    def models(self) -> Path:
        return self.dir / "models"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.pkl"

    def fold_level2(self, name: str, k: int) -> Path:
        return self.models / f"fold{k}" / f"{name}.pkl"

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle"


@dataclass(frozen=True)
class CnnLayout:
    """One CNN's folder of a run: its fold models, refit model, graphs and int8 gate."""

    dir: Path
    name: str

    def fold_model(self, k: int) -> Path:
        return self.dir / f"fold{k}.pt"

    def fold_summary(self, k: int) -> Path:
        return self.dir / f"fold{k}.json"

    def fold_oof(self, k: int) -> Path:
        return self.dir / f"oof_fold{k}.csv"

    @property
    def refit(self) -> Path:
        return self.dir / "refit.pt"

    @property
    def fp32_graph(self) -> Path:
        return self.dir / graph_files(self.name)[0]

    @property
    def int8_graph(self) -> Path:
        return self.dir / graph_files(self.name)[1]

    @property
    def quantization(self) -> Path:
        return self.dir / "quantization.json"
