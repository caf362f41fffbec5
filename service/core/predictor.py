"""Load a model bundle and run the whole stack on (images, metadata). Torch-free.

This is also the offline inference API: `Predictor.load(dir).predict(images, metadata)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.core.bundle import BundleError, check_libraries, read_manifest, read_verified
from service.core.features import build_features, image_stats, soft_vote, stack_inputs
from service.core.manifest import Manifest
from service.core.metadata import ClinicalMetadata, validate_metadata
from service.core.preprocess import to_model_input
from service.core.safe_pickle import load_model

MetadataLike = ClinicalMetadata | Mapping[str, Any] | None


@dataclass
class Prediction:
    components: dict[str, np.ndarray]  # model name -> (C,) probabilities
    served: str  # the component that is the answer

    @property
    def probabilities(self) -> np.ndarray:
        return self.components[self.served]


def cnn_graph(manifest: Manifest, precision: str) -> str:
    """The bundle file of the CNN graph to serve."""
    cnn = manifest.cnn
    if precision == "auto" or cnn.precision == "fp32":
        return cnn.file
    if cnn.fp32_file is None:
        raise BundleError(
            "fp32 CNN asked for, but this bundle carries only its int8 graph "
            "(train with --keep-fp32 to bundle both, or serve with cnn precision auto)"
        )
    return cnn.fp32_file


def thread_limit(model: Any, threads: int) -> dict[str, int]:
    """Limit an estimator's threads: scikit-learn style `n_jobs` is set on the model (XGBoost and
    LightGBM read it when predicting); a `thread_count` argument of predict_proba (CatBoost, whose
    fitted models refuse set_params) is returned, to be passed on every call."""
    params = model.get_params() if hasattr(model, "get_params") else {}
    if "n_jobs" in params:
        model.set_params(n_jobs=threads)
        return {}
    if "thread_count" in inspect.signature(model.predict_proba).parameters:
        return {"thread_count": threads}
    return {}


class Predictor:
    """A loaded bundle. Immutable after `load`, so safe to share across threads."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        session: Any,
        models: dict[str, Any],
        cnn_file: str,
        model_threads: int = 1,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.session = session
        self.models = models
        self.cnn_file = cnn_file  # the graph `session` runs
        self.predict_kwargs = {name: thread_limit(model, model_threads) for name, model in models.items()}

    @property
    def cnn_precision(self) -> str:
        """Of the graph `session` runs: the manifest's CNN, or its fp32 graph."""
        return self.manifest.cnn.precision if self.cnn_file == self.manifest.cnn.file else "fp32"

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

        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir, public_key_pem)
        check_libraries(manifest)
        cnn_file = cnn_graph(manifest, cnn_precision)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        try:
            session = ort.InferenceSession(
                read_verified(bundle_dir, manifest, cnn_file), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"cannot load {cnn_file}: {exc}") from None
        names = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if manifest.cnn.input_name not in names[0] or manifest.cnn.output_name not in names[1]:
            raise BundleError(
                f"{cnn_file} has no input {manifest.cnn.input_name!r} / output {manifest.cnn.output_name!r}"
            )
        models = {
            m.name: load_model(read_verified(bundle_dir, manifest, m.file), m.libraries, m.file)
            for m in [*manifest.boosters, manifest.stack]
        }
        return cls(bundle_dir, manifest, session, models, cnn_file, model_threads)

    def cnn_probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N,H,W,3) -> the CNN's class probabilities (N,C)."""
        x = to_model_input(images, self.manifest.preprocessing)
        (probs,) = self.session.run([self.manifest.cnn.output_name], {self.manifest.cnn.input_name: x})
        return probs.astype(np.float64)

    def predict_components(
        self, images: np.ndarray, metadata: Sequence[MetadataLike], cnn_probs: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Every model's probabilities for a batch: name -> (N,C). Raises MetadataError for bad metadata."""
        m = self.manifest
        if len(metadata) != len(images):
            raise ValueError(f"{len(images)} images but {len(metadata)} metadata entries")
        meta = [validate_metadata(v, m.features) for v in metadata]
        if cnn_probs is None:
            cnn_probs = self.cnn_probs(images)
        feats = build_features(cnn_probs, meta, image_stats(images), m.features)
        probs = {m.cnn.name: cnn_probs}
        for booster in m.boosters:
            model, kwargs = self.models[booster.name], self.predict_kwargs[booster.name]
            probs[booster.name] = model.predict_proba(feats, **kwargs).astype(np.float64)
        probs[m.soft_vote] = soft_vote(probs, m.level1)
        probs[m.stack.name] = self.models[m.stack.name].predict_proba(stack_inputs(probs, m.level1)).astype(np.float64)
        return probs

    def predict(self, images: np.ndarray, metadata: Sequence[MetadataLike]) -> list[Prediction]:
        comps = self.predict_components(images, metadata)
        return [Prediction({k: v[i] for k, v in comps.items()}, self.manifest.served) for i in range(len(images))]
