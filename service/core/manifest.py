"""The bundle's manifest: one schema, written by training and read by the service.

It is the only roster of models: which level-1 models feed the soft vote and the stack (in
order), which file holds each one, the ONNX graph's input/output names, the metadata encoder,
and which libraries each file needs. Serving code reads every model name from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.features import FeatureSpec
from service.core.graph import can_explain, can_score_ood
from service.core.lesions import LesionRule
from service.core.ood import OodSpec
from service.core.preprocess import ImageSpec
from service.core.priors import NamedPrior
from service.core.signing import MANIFEST_NAME, SIGNATURE_NAME
from service.core.triage import TriageSpec

TRAINING_IMAGES = "training_images.csv"  # the bundle's list of its training images (image_id, lesion_id)

FORMAT_VERSION = 5  # 5: several CNNs (`cnns`); 4: explanation outputs, OOD score, class prior and temperature, card
READABLE_VERSIONS = (2, 3, 4, 5)  # older manifests name one `cnn` (and may lack explanations, OOD score or card)
MODEL_CARD = "MODEL_CARD.md"


class ModelFile(BaseModel):
    name: str = Field(description="the model's name in responses, metrics and reports")
    file: str = Field(description="file inside the bundle folder")
    libraries: list[str] = Field(description="Python distributions needed to load the file")


class GateMetric(BaseModel):
    """One figure of the served answer with the fp32 CNN and with the int8 one, on the same images."""

    fp32: float
    int8: float
    relative_loss: float = Field(description="(fp32 - int8) / fp32: the share of the fp32 figure that int8 loses")
    difference_ci95: list[float] = Field(description="int8 - fp32: 95% paired lesion-bootstrap interval")


class GateCheck(BaseModel):
    """int8 against fp32 on the same images, measured on the answer the service gives."""

    images: int
    passed: bool
    metrics: dict[str, GateMetric] = Field(description="the served answer's BMCA, malignant AUC and pAUC")
    cnn_agreement: float = Field(ge=0, le=1, description="top-1 agreement of the int8 CNN with fp32 (reported only)")
    answer_agreement: float = Field(ge=0, le=1, description="top-1 agreement of the served answers (reported only)")


class QuantizationAttempt(BaseModel):
    """One int8 configuration: which layers stayed fp32, and its checks."""

    config: str
    fp32_nodes: list[str] = Field(description="graph nodes left in fp32 (besides the classifier and softmax)")
    folds: GateCheck = Field(description="the fold models on their out-of-fold images")
    refit: GateCheck | None = Field(None, description="the refit model on its own (training) images")

    @property
    def passed(self) -> bool:
        return self.folds.passed and (self.refit is None or self.refit.passed)


class QuantizationGate(BaseModel):
    """The accuracy-aware int8 gate (training.cnn.quantize): configurations tried in order, the
    first that passes is served; none passing serves fp32."""

    passed: bool
    images: int
    agreement: float = Field(ge=0, le=1, description="top-1 agreement of the int8 CNN with fp32 (reported only)")
    served_model: str = Field("fold ensemble", description="the CNN whose int8 graph the bundle would serve")
    rule: str = Field("", description="what passing means")
    max_relative_loss: float | None = Field(None, description="largest allowed relative loss of each gated figure")
    answer: str | None = Field(None, description="the served combiner whose answer the gate measured")
    config: str | None = Field(None, description="the configuration that passed (or the last one tried)")
    fp32_nodes: list[str] = Field(default_factory=list, description="that configuration's fp32 nodes")
    attempts: list[QuantizationAttempt] = Field(default_factory=list, description="every configuration tried, in order")


class MonitoringReference(BaseModel):
    """What the served answers looked like out-of-fold: the baseline of the service's drift gauges."""

    label_shares: dict[str, float] = Field(description="the served model's out-of-fold top-1 shares (as trained)")
    referral_shares: dict[str, float] = Field(
        default_factory=dict, description="triage point -> the share of images it referred where it was measured"
    )
    ood_score_edges: list[float] = Field(
        default_factory=list,
        description="inner edges of 10 equal-share bins of the out-of-fold OOD score (served method)",
    )


class Choice(BaseModel):
    """A choice among candidates by a rule fixed in advance, made on out-of-fold predictions and
    nested in the outer folds (training.ensemble.selection)."""

    chosen: str = Field(description="what the bundle uses: the rule's pick, or what the run requested")
    picked: str = Field(description="the rule's pick on every out-of-fold row")
    requested: str | None = Field(None, description="set when the run named the choice itself (--served)")
    rule: str
    scores: dict[str, dict[str, float]] = Field(description="candidate -> the rule's figures on every out-of-fold row")
    fold_picks: list[str] = Field(description="outer fold k: the rule's pick on the other folds' rows")


class CnnModel(ModelFile):
    input_name: str = Field(description="ONNX input: normalised float32 images, NCHW")
    output_name: str = Field(description="ONNX output: class probabilities")
    members: int = Field(ge=1, description="models averaged inside the graph (1: the refit model)")
    architecture: str
    weights: str | None = Field(None, description="its initialisation: imagenet, none, or a weights file's name")
    weights_source: str | None = Field(None, description="where the initial weights came from, in words")
    weights_sha256: str | None = Field(None, description="sha256 of the initial weights file, when there was one")
    training_precision: str = Field(description="autocast used while training")
    precision: Literal["fp32", "int8"] = Field("fp32", description="weights and activations of `file`")
    fp32_file: str | None = Field(None, description="the fp32 graph, when an int8 `file` is served beside it")
    quantization: QuantizationGate | None = Field(None, description="the int8 gate, when one was measured")
    tta: bool = Field(False, description="the graph averages the 8 dihedral flips of each image (8x the cost)")
    explain_outputs: list[str] = Field(
        default_factory=list,
        description="further ONNX outputs for the image as given: class activation maps (N,C,h,w), embedding, logits",
    )

    @property
    def files(self) -> list[str]:
        return [self.file] + ([self.fp32_file] if self.fp32_file else [])

    @property
    def has_ood_outputs(self) -> bool:
        """The served graph gives what the out-of-distribution score reads."""
        return can_score_ood(self.explain_outputs)

    @property
    def can_explain(self) -> bool:
        """The served graph draws class activation maps (explain=true)."""
        return can_explain(self.explain_outputs)


class TrainingSummary(BaseModel):
    """What the bundle learned from, as training wrote it. `config` and `data` stay open dicts: they
    hold training's own settings and data summary (training.config.RunConfig, the report's `data`),
    whose keys change with training, and older bundles hold older ones. Other keys are kept as read."""

    model_config = ConfigDict(extra="allow")

    config: dict[str, Any] = Field(default_factory=dict, description="the run's settings (RunConfig)")
    data: dict[str, Any] = Field(default_factory=dict, description="the data: images, lesions, class counts, folds")
    report: str | None = Field(None, description="the run's report.json, relative to the run folder")


def libraries_of(models: list[ModelFile]) -> list[str]:
    """Every distribution the given models need, sorted, once each."""
    return sorted({lib for m in models for lib in m.libraries})


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    bundle_id: str
    created_at: str
    synthetic_data: bool = Field(
        False,
        description="trained on the project's synthetic demo images: a demo of the plumbing, not a model of lesions",
    )
    classes: list[str] = Field(min_length=2)
    class_names: dict[str, str]
    malignant_classes: list[str]
    preprocessing: ImageSpec
    features: FeatureSpec = Field(description="the feature encoder; also the metadata a request may carry")
    cnns: list[CnnModel] = Field(
        min_length=1, description="the CNNs, each a level-1 model; the first (the lead) draws heatmaps and scores OOD"
    )
    boosters: list[ModelFile] = Field(description="level-1 models on features, in the order the stack reads them")
    soft_vote: str = Field(description="name of the level-1 models' average")
    stack: ModelFile = Field(description="the meta-learner over the level-1 models' log-probabilities")
    served: str = Field(description="the component whose probabilities are the answer")
    served_choice: Choice | None = Field(None, description="how `served` was chosen (bundles since lesion answers)")
    lesion_rule: LesionRule = Field("mean", description="how a lesion's images' answers combine into one")
    lesion_rule_choice: Choice | None = Field(None, description="how `lesion_rule` was chosen")
    training_images: str | None = Field(
        None, description="CSV (image_id, lesion_id) of every image the models trained on: overlap checks"
    )
    ood: OodSpec | None = Field(None, description="the out-of-distribution score and its thresholds")
    monitoring: MonitoringReference | None = Field(None, description="the drift gauges' out-of-fold baseline")
    triage: TriageSpec | None = Field(
        None, description="triage operating points and where they were measured (None: bundles before them)"
    )
    default_prior: NamedPrior = Field("balanced", description="class prior of the served probabilities (a named prior)")
    training_prevalence: dict[str, float] = Field(
        default_factory=dict, description="class shares of the training data: the 'training' prior"
    )
    temperature: float = Field(
        1.0,
        ge=0.01,
        le=100,
        allow_inf_nan=False,
        description="applied to every model's log-probabilities before the prior",
    )
    model_card: str | None = Field(None, description="the bundle's model card (markdown)")
    files: dict[str, str] = Field(description="file name -> sha256, every file of the bundle but this manifest")
    library_versions: dict[str, str] = Field(description="versions of the libraries the models need, as written")
    metrics: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="model -> metric -> cross-validated value, from report.json"
    )  # None: a NaN of the report (a metric undefined on the data, such as macro AUC without every class)
    metric_intervals: dict[str, dict[str, list[float | None]]] = Field(
        default_factory=dict, description="95% lesion-bootstrap intervals of `metrics`, [low, high], from report.json"
    )
    training: TrainingSummary = Field(default_factory=TrainingSummary, description="run configuration and data summary")

    @model_validator(mode="before")
    @classmethod
    def _one_cnn_before_version_5(cls, data: object) -> object:
        """Bundles before version 5 name their one CNN `cnn`, whose probabilities are its features' first."""
        if isinstance(data, dict) and "cnn" in data and "cnns" not in data:
            cnn, features = data["cnn"], data.get("features")
            data = {k: v for k, v in data.items() if k != "cnn"} | {"cnns": [cnn]}
            if isinstance(features, dict) and isinstance(cnn, dict) and "cnns" not in features and "name" in cnn:
                data["features"] = features | {"cnns": [cnn["name"]]}
        return data

    @property
    def cnn(self) -> CnnModel:
        """The lead CNN: its graph draws the heatmaps and gives the out-of-distribution score."""
        return self.cnns[0]

    @property
    def level1(self) -> list[str]:
        """Models whose probabilities the soft vote averages and the stack stacks, in order."""
        return [c.name for c in self.cnns] + [b.name for b in self.boosters]

    @property
    def components(self) -> list[str]:
        """Every model a prediction reports, in order."""
        return self.level1 + [self.soft_vote, self.stack.name]

    @property
    def model_files(self) -> list[ModelFile]:
        return [*self.cnns, *self.boosters, self.stack]

    @property
    def required_libraries(self) -> list[str]:
        return libraries_of(self.model_files)

    @property
    def model_file_names(self) -> list[str]:
        """Every file a model is loaded from: each model's file and each int8 CNN's fp32 graph."""
        return [m.file for m in self.model_files] + [f for c in self.cnns for f in c.files[1:]]

    @property
    def listed_files(self) -> list[str]:
        """Every bundle file the manifest names: the models' files, the training images, the card, the OOD fits."""
        extras = [self.training_images, self.model_card, *([self.ood.file, self.ood.image_file] if self.ood else [])]
        return self.model_file_names + [f for f in extras if f]

    # The checks below run in this order and the first that fails is the error a reader reports (a
    # bundle error names one fault); keep the order when adding one.

    @model_validator(mode="after")
    def _classes_agree(self) -> Manifest:
        """The feature encoder reads these classes and CNNs; class names and malignant classes are of these classes."""
        if self.features.classes != self.classes:
            raise ValueError(f"features.classes {self.features.classes} differ from classes {self.classes}")
        if self.features.cnns != [c.name for c in self.cnns]:
            raise ValueError(f"features.cnns {self.features.cnns} differ from the CNNs {[c.name for c in self.cnns]}")
        if sorted(set(self.classes) - set(self.class_names)):
            raise ValueError(f"class_names lacks {sorted(set(self.classes) - set(self.class_names))}")
        if not set(self.malignant_classes) <= set(self.classes):
            raise ValueError(f"malignant_classes {self.malignant_classes} are not all among {self.classes}")
        return self

    @model_validator(mode="after")
    def _training_prevalence_is_shares(self) -> Manifest:
        """The training data's class shares, when given: one positive share per class, summing to 1."""
        shares = self.training_prevalence
        if shares and set(shares) != set(self.classes):
            raise ValueError("training_prevalence must give a share for every class, and only for those")
        if shares and not (all(0 < v <= 1 for v in shares.values()) and abs(sum(shares.values()) - 1) < 1e-3):
            raise ValueError("training_prevalence values must be positive shares summing to 1")
        return self

    @model_validator(mode="after")
    def _roster_is_consistent(self) -> Manifest:
        """Model names are distinct, and the served model and the recorded choices name what is used."""
        names = self.components
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        if self.served not in names:
            raise ValueError(f"served model {self.served!r} is not one of {names}")
        if self.served_choice and self.served_choice.chosen != self.served:
            raise ValueError(f"served_choice chose {self.served_choice.chosen!r}, but {self.served!r} is served")
        if self.lesion_rule_choice and self.lesion_rule_choice.chosen != self.lesion_rule:
            raise ValueError(f"lesion_rule_choice chose {self.lesion_rule_choice.chosen!r}, not {self.lesion_rule!r}")
        return self

    @model_validator(mode="after")
    def _file_names_are_plain(self) -> Manifest:
        """Each hashed file is a plain name inside the bundle folder: no path, and not the manifest or its signature."""
        for f in self.files:
            if not f or f in (".", "..") or any(c in f for c in "/\\\x00") or f in (MANIFEST_NAME, SIGNATURE_NAME):
                raise ValueError(f"file name {f!r} is not a plain name inside the bundle")
        return self

    @model_validator(mode="after")
    def _files_are_hashed(self) -> Manifest:
        """Every file the manifest names has a sha256 in `files` (so it is checked before use)."""
        for f in self.listed_files:
            if f not in self.files:
                raise ValueError(f"bundle file {f!r} is not among the hashed files")
        return self

    @model_validator(mode="after")
    def _fp32_file_is_for_int8(self) -> Manifest:
        """Only an int8 CNN keeps its fp32 graph beside it."""
        if any(c.fp32_file and c.precision != "int8" for c in self.cnns):
            raise ValueError("a CNN's fp32_file is only for an int8 file")
        return self

    @model_validator(mode="after")
    def _model_files_are_distinct(self) -> Manifest:
        """No two models (or a model and an fp32 graph) share a file."""
        used = self.model_file_names
        if len(set(used)) != len(used):
            raise ValueError(f"model files repeat: {used}")
        return self

    @model_validator(mode="after")
    def _int8_has_a_passed_gate(self) -> Manifest:
        """An int8 CNN is served only with the accuracy gate it passed."""
        for cnn in self.cnns:
            if cnn.precision == "int8" and not (cnn.quantization and cnn.quantization.passed):
                raise ValueError(f"{cnn.name}: an int8 file needs a passed quantization gate in the manifest")
        return self

    @model_validator(mode="after")
    def _every_hashed_file_is_used(self) -> Manifest:
        """No hashed file is left over: the roster and the file list agree."""
        unused = sorted(set(self.files) - set(self.listed_files))
        if unused:
            raise ValueError(f"hashed files {unused} belong to no model: the roster and the file list must agree")
        return self

    @model_validator(mode="after")
    def _prior_is_usable(self) -> Manifest:
        """The default prior "training" needs the training data's class shares (the field's type names the priors)."""
        if self.default_prior == "training" and set(self.training_prevalence) != set(self.classes):
            raise ValueError("default_prior training needs a training_prevalence for every class")
        return self

    @model_validator(mode="after")
    def _ood_has_its_outputs(self) -> Manifest:
        """An OOD score needs the lead CNN's graph to give what it reads."""
        if self.ood and not self.cnn.has_ood_outputs:
            raise ValueError("an OOD score needs the CNN graph's embedding and logits outputs")
        return self

    @model_validator(mode="after")
    def _libraries_are_versioned(self) -> Manifest:
        """Every library a model needs has the version it was written with (checked against the installed one)."""
        missing = [lib for lib in self.required_libraries if lib not in self.library_versions]
        if missing:
            raise ValueError(f"library_versions lacks {missing}")
        return self


PATH_KEYS = ("data_dir", "weights")  # a folder or file of the training machine (weights: or none, imagenet)


def without_paths(training: TrainingSummary | Mapping[str, Any]) -> dict[str, Any]:
    """The training summary, as a dict of the keys it was given, with each data folder and weights file
    reduced to its name: a bundle says which data and initialisation it learned from, not the layout of
    the machine that trained it."""
    if isinstance(training, TrainingSummary):
        training = training.model_dump(exclude_unset=True)  # the keys as read: none added by defaults

    def reduced(section: dict) -> dict:
        return {k: PurePath(v).name if k in PATH_KEYS and isinstance(v, str) else v for k, v in section.items()}

    return {k: reduced(v) if isinstance(v, dict) else v for k, v in training.items()}
