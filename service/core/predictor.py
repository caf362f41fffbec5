"""Load a model bundle and run the whole stack on (images, metadata). Torch-free.

This is also the offline inference API: `Predictor.load(dir).predict(images, metadata)`.
"""

from __future__ import annotations

import functools
import inspect
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.core.bundle import BundleError, check_libraries, read_manifest, read_verified
from service.core.errors import PriorError
from service.core.explain import feature_groups, group_attributions, heatmap_pngs, tree_shap
from service.core.features import build_features, image_stats, soft_vote, stack_inputs
from service.core.graph import CAM, EMBEDDING, LOGITS, OOD_OUTPUTS
from service.core.manifest import CnnModel, Manifest
from service.core.metadata import ClinicalMetadata, validate_metadata
from service.core.ood import GaussianFit, image_statistics, mahalanobis, scores
from service.core.preprocess import to_model_input
from service.core.priors import NAMED, adjust, prior_vector
from service.core.safe_pickle import load_model

MetadataLike = ClinicalMetadata | Mapping[str, Any] | None


@dataclass
class Prediction:
    components: dict[str, np.ndarray]  # model name -> (C,) probabilities
    served: str  # the component that is the answer
    ood_score: float | None = None  # the bundle's out-of-distribution score (None: the bundle has none)
    image_ood_score: float | None = None  # its image-statistics score (None: the bundle has no such check)

    @property
    def probabilities(self) -> np.ndarray:
        return self.components[self.served]

    def under_prior(self, prior: np.ndarray, temperature: float = 1.0) -> Prediction:
        """Every component moved from the balanced prior it was trained under to `prior` (service.core.priors)."""
        comps = {k: adjust(v[None], prior, temperature)[0] for k, v in self.components.items()}
        return replace(self, components=comps)


@dataclass
class Explanation:
    label: str  # the class explained: the served answer
    cam: np.ndarray  # (h, w) its class activation map, at the CNN's last feature-map resolution
    heatmap_png: str  # base64 PNG: the map, normalised to [0,1], over the model-size image
    map_png: str  # base64 PNG: the map alone in the colour scale, model size, to lay over the original
    attributions: dict[str, dict[str, float]]  # booster -> input group -> contribution to its raw score


def read_fit(bundle_dir: Path, manifest: Manifest, file: str, n_classes: int) -> GaussianFit:
    try:
        return GaussianFit.from_npz(read_verified(bundle_dir, manifest, file), n_classes)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(f"{file} is not a valid out-of-distribution fit: {exc}") from None


def cnn_graph(cnn: CnnModel, precision: str) -> str:
    """The bundle file of the CNN graph to serve."""
    if precision == "auto" or cnn.precision == "fp32":
        return cnn.file
    if cnn.fp32_file is None:
        raise BundleError(
            f"fp32 CNN asked for, but this bundle carries only the int8 graph of {cnn.name} "
            "(train with --keep-fp32 to bundle both, or serve with cnn precision auto)"
        )
    return cnn.fp32_file


def cnn_session(bundle_dir: Path, manifest: Manifest, cnn: CnnModel, file: str, opts: Any) -> Any:
    """An onnxruntime session of one CNN graph, from the bytes whose sha256 was just checked, with
    the inputs and outputs the manifest promises."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(
            read_verified(bundle_dir, manifest, file), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"cannot load {file}: {exc}") from None
    names = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
    if cnn.input_name not in names[0] or cnn.output_name not in names[1]:
        raise BundleError(f"{file} has no input {cnn.input_name!r} / output {cnn.output_name!r}")
    if set(cnn.explain_outputs) - names[1]:
        raise BundleError(f"{file} lacks the outputs {sorted(set(cnn.explain_outputs) - names[1])}")
    return session


def probability_fn(model: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The model's class probabilities on `threads` threads, as a function of the features.

    LightGBM's own booster is called directly (the same numbers: its scikit-learn wrapper only
    re-validates the input first, 0.9 ms for one row against 0.1 ms). A scikit-learn style `n_jobs`
    is set on the model (XGBoost reads it when predicting); CatBoost, whose fitted models refuse
    set_params, takes `thread_count` on every call."""
    params = model.get_params() if hasattr(model, "get_params") else {}
    if "n_jobs" in params:
        model.set_params(n_jobs=threads)
    elif "thread_count" in inspect.signature(model.predict_proba).parameters:
        return functools.partial(model.predict_proba, thread_count=threads)
    booster = getattr(model, "booster_", None)
    if type(model).__module__.startswith("lightgbm.") and booster is not None:
        return functools.partial(lightgbm_probabilities, booster, threads=threads)
    return model.predict_proba


def lightgbm_probabilities(booster: Any, x: np.ndarray, threads: int) -> np.ndarray:
    """(N, C) as LGBMClassifier.predict_proba gives them (a binary booster returns P(class 1) only)."""
    p = np.asarray(booster.predict(x, num_threads=threads))
    return np.column_stack([1 - p, p]) if p.ndim == 1 else p


def limit_numpy_blas(threads: int) -> None:
    """Cap the BLAS that numpy and scipy use at `threads` threads, for the whole process (never
    raised). A serving process calls it once: its BLAS work is small (the meta-learner, the
    Mahalanobis distance), and after a multi-threaded BLAS call the library's threads keep spinning
    on the cores, which made the next CNN call about twice as slow on 2 cores."""
    from threadpoolctl import ThreadpoolController  # scikit-learn's own dependency

    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        # threadpoolctl lets one thread at a time set a process-wide OpenBLAS pool ("controlling
        # thread", silently ignoring others): take the role, set the size, give the role back
        release = getattr(type(lib), "clear_controlling_thread", lambda force: None)
        release(force=True)
        if lib.num_threads > threads:
            lib.set_num_threads(threads)
        release(force=True)


class Predictor:
    """A loaded bundle. Immutable after `load`, so safe to share across threads."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        sessions: dict[str, Any],
        models: dict[str, Any],
        cnn_files: dict[str, str],
        model_threads: int = 1,
        gaussian: GaussianFit | None = None,
        model_card: str | None = None,
        image_fit: GaussianFit | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.sessions = sessions  # CNN name -> its onnxruntime session
        self.models = models
        self.cnn_files = cnn_files  # CNN name -> the graph its session runs
        self.probabilities = {name: probability_fn(model, model_threads) for name, model in models.items()}
        self.gaussian = gaussian  # the Mahalanobis score's class means and precision
        self.image_fit = image_fit  # the image statistics' mean and precision
        self.model_card = model_card  # MODEL_CARD.md, when the bundle has one
        self.named_priors: dict[str, tuple[np.ndarray, float] | None] = {}  # NAMED priors, computed once
        for name in NAMED:
            try:
                self.named_priors[name] = self.prior(name)
            except PriorError:  # an unusable training prevalence: asking for it stays an error
                pass

    def cnn_precision(self, cnn: CnnModel) -> str:
        """Of the graph a CNN's session runs: the manifest's file, or its fp32 graph."""
        return cnn.precision if self.cnn_files[cnn.name] == cnn.file else "fp32"

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        public_key_pem: bytes | None = None,
        cnn_precision: Literal["auto", "fp32"] = "auto",
        model_threads: int = 1,
    ) -> Predictor:
        """Check the signature (if a public key is given) and the library versions, then load each
        model from the very bytes whose sha256 was just checked; pickles go through an allow-list.

        cnn_precision "auto" serves the manifest's `cnn.file` (int8 when it passed its gate);
        "fp32" the fp32 graph, which an int8 bundle carries only if it was built to.
        model_threads: threads each booster may use per call (1 for the small batches of serving:
        a single row is slower on several threads, and workers would oversubscribe the cores)."""
        import onnxruntime as ort

        bundle_dir = Path(bundle_dir).resolve()  # once: a `current` link switched mid-load cannot mix two bundles
        manifest = read_manifest(bundle_dir, public_key_pem)
        check_libraries(manifest)
        cnn_files = {c.name: cnn_graph(c, cnn_precision) for c in manifest.cnns}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        # no busy-waiting between runs: the CNN's idle threads spun on the cores that decode the next
        # requests (sample cpu bundle, 2 cores, hey: 8 clients 122 -> 140 requests/s, p50 at 1 client 12.2 -> 11.1 ms)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {c.name: cnn_session(bundle_dir, manifest, c, cnn_files[c.name], opts) for c in manifest.cnns}
        ood = manifest.ood
        gaussian = image_fit = None
        if ood is not None and ood.method == "mahalanobis":
            gaussian = read_fit(bundle_dir, manifest, ood.file, len(manifest.classes))
        if ood is not None and ood.image_file is not None:
            image_fit = read_fit(bundle_dir, manifest, ood.image_file, 1)
        models = {
            m.name: load_model(read_verified(bundle_dir, manifest, m.file), m.libraries, m.file)
            for m in [*manifest.boosters, manifest.stack]
        }
        card = read_verified(bundle_dir, manifest, manifest.model_card).decode() if manifest.model_card else None
        return cls(bundle_dir, manifest, sessions, models, cnn_files, model_threads, gaussian, card, image_fit)

    def warm_up(self) -> None:
        """One prediction on a grey image, checked: every model gives one finite probability per
        class summing to 1, and the OOD score is finite. A bundle that fails is refused (BundleError)
        before it serves: a NaN would otherwise pass silently (a NaN score is never flagged)."""
        spec, m = self.manifest.preprocessing, self.manifest
        try:
            (pred,) = self.predict(np.full((1, spec.height, spec.width, 3), 128, np.uint8), [None])
        except BundleError:
            raise
        except Exception as exc:  # a model that loads but cannot predict: any library's error type
            raise BundleError(
                f"the bundle's models fail on a test image: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        for name, p in pred.components.items():
            if p.shape != (len(m.classes),) or not np.isfinite(p).all() or abs(p.sum() - 1) > 1e-3:
                raise BundleError(f"model {name} does not give {len(m.classes)} finite probabilities summing to 1")
        if m.ood is not None and not (pred.ood_score is not None and np.isfinite(pred.ood_score)):
            raise BundleError(f"the out-of-distribution score ({m.ood.method}) is not a finite number")
        if self.image_fit is not None and not (pred.image_ood_score is not None and np.isfinite(pred.image_ood_score)):
            raise BundleError("the image-statistics out-of-distribution score is not a finite number")

    def cnn_outputs(
        self, images: np.ndarray, extra: Sequence[str] = ()
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """uint8 images (N,H,W,3) -> each CNN's class probabilities (N,C) by name, and the lead CNN's
        `extra` outputs asked for (heatmaps, embedding, logits) by output name. Each graph runs once,
        on one copy of the model input."""
        x = to_model_input(images, self.manifest.preprocessing)
        probs: dict[str, np.ndarray] = {}
        lead: dict[str, np.ndarray] = {}
        for i, cnn in enumerate(self.manifest.cnns):
            names = [cnn.output_name, *(extra if i == 0 else ())]
            out = self.sessions[cnn.name].run(names, {cnn.input_name: x})
            probs[cnn.name] = out[0].astype(np.float64)
            lead = {n: v.astype(np.float64) for n, v in zip(names[1:], out[1:])} if i == 0 else lead
        return probs, lead

    def cnn_probs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images (N,H,W,3) -> each CNN's class probabilities (N,C), by name."""
        return self.cnn_outputs(images)[0]

    def prior(self, prior: str | Mapping[str, float] | None) -> tuple[np.ndarray, float] | None:
        """A request's prior (None: the bundle's default) -> (prior vector, temperature), or None when
        the probabilities stay as trained (a uniform prior: the balanced models' own). The temperature
        was fitted with a real population's prior, so it comes only with one. Raises PriorError."""
        m = self.manifest
        prior = m.default_prior if prior is None else prior
        if isinstance(prior, str) and prior in self.named_priors:  # what nearly every request asks
            return self.named_priors[prior]
        vec = prior_vector(prior, m.classes, m.training_prevalence)
        return None if np.allclose(vec, 1.0 / len(vec)) else (vec, m.temperature)

    def predict_components(
        self,
        images: np.ndarray,
        metadata: Sequence[MetadataLike],
        cnn_probs: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every model's probabilities for a batch: name -> (N,C). Raises MetadataError for bad metadata."""
        m = self.manifest
        if len(metadata) != len(images):
            raise ValueError(f"{len(images)} images but {len(metadata)} metadata entries")
        meta = [validate_metadata(v, m.features) for v in metadata]
        if cnn_probs is None:
            cnn_probs = self.cnn_probs(images)
        feats = build_features(cnn_probs, meta, image_stats(images), m.features)
        probs = dict(cnn_probs)
        for booster in m.boosters:
            probs[booster.name] = self.probabilities[booster.name](feats).astype(np.float64)
        probs[m.soft_vote] = soft_vote(probs, m.level1)
        probs[m.stack.name] = self.probabilities[m.stack.name](stack_inputs(probs, m.level1)).astype(np.float64)
        return probs

    def predict(self, images: np.ndarray, metadata: Sequence[MetadataLike]) -> list[Prediction]:
        """Every model's probabilities as trained (balanced prior) and the OOD score, per image."""
        ood = self.manifest.ood
        cnn_probs, outs = self.cnn_outputs(images, OOD_OUTPUTS if ood else ())
        comps = self.predict_components(images, metadata, cnn_probs)
        none = [None] * len(images)
        score = scores(ood.method, outs[EMBEDDING], outs[LOGITS], self.gaussian) if ood else none
        image_score = none if self.image_fit is None else mahalanobis(image_statistics(images), self.image_fit)
        return [
            Prediction(
                {k: v[i] for k, v in comps.items()},
                self.manifest.served,
                None if s is None else float(s),
                None if t is None else float(t),
            )
            for i, (s, t) in enumerate(zip(score, image_score))
        ]

    def explain(self, images: np.ndarray, metadata: Sequence[MetadataLike], labels: Sequence[str]) -> list[Explanation]:
        """For each image, why `labels[i]` (the served answer): its class activation map and heatmap,
        and each booster's TreeSHAP contributions for that class summed per input group."""
        m = self.manifest
        if not m.cnn.can_explain:
            raise BundleError("this bundle's CNN graph has no class activation maps; export it again to explain")
        cnn_probs, outs = self.cnn_outputs(images, [CAM])
        meta = [validate_metadata(v, m.features) for v in metadata]
        feats = build_features(cnn_probs, meta, image_stats(images), m.features)
        groups = feature_groups(m.features)
        shap = {b.name: tree_shap(self.models[b.name], feats) for b in m.boosters}
        out = []
        for i, label in enumerate(labels):
            c = m.classes.index(label)
            cam = outs[CAM][i, c]
            attributions = {name: group_attributions(v[i, c], groups) for name, v in shap.items()}
            out.append(Explanation(label, cam, *heatmap_pngs(images[i], cam), attributions))
        return out
