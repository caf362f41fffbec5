"""Load a model bundle and run the whole stack on (image, metadata). Torch-free.

This is the offline inference code too: training's tests call it to prove the bundle
reproduces what training computed.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.features import LEVEL1_MODELS, ClinicalMetadata, build_features, image_stats, soft_vote, stack_inputs
from service.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, library_versions, sha256_file
from service.preprocess import to_model_input

COMPONENTS = LEVEL1_MODELS + ["soft_vote", "stack"]


class BundleError(RuntimeError):
    """The bundle is missing, tampered with or incompatible; the message says which."""


@dataclass
class Prediction:
    components: dict[str, np.ndarray]  # model name -> (C,) probabilities

    @property
    def probabilities(self) -> np.ndarray:
        return self.components["stack"]


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleError(
            f"no {MANIFEST_NAME} in {bundle_dir}: not a model bundle (train one with `python -m training run`)"
        )
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not a valid manifest: {str(exc).splitlines()[0]}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format_version {manifest.format_version} is not supported (this service reads {FORMAT_VERSION})"
        )
    return manifest


def verify_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    """Check every file's sha256 and the library versions, before anything is unpickled."""
    for name, digest in manifest.files.items():
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {bundle_dir}")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: refusing to load it")
    installed = library_versions()
    for lib, wrote in manifest.library_versions.items():
        have = installed.get(lib)
        if have is not None and wrote.split(".")[:2] != have.split(".")[:2]:
            raise BundleError(f"bundle was written with {lib} {wrote} but {have} is installed; install {lib}=={wrote}")


class Predictor:
    """A loaded bundle. Immutable after `load`, so safe to share across threads."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, session, models: dict) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.session = session
        self.models = models

    @classmethod
    def load(
        cls, bundle_dir: str | Path, intra_op_threads: int = 0, inter_op_threads: int = 1, verify: bool = True
    ) -> "Predictor":
        """verify=False only where the caller has just run `verify_bundle` on the same folder."""
        import onnxruntime as ort

        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir)
        if verify:
            verify_bundle(bundle_dir, manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        try:
            session = ort.InferenceSession(
                str(bundle_dir / manifest.cnn.file), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"cannot load {manifest.cnn.file}: {exc}") from None
        models = {}
        for name, file in manifest.models.items():
            with open(bundle_dir / file, "rb") as f:
                models[name] = pickle.load(f)  # noqa: S301 - sha256 verified above
        return cls(bundle_dir, manifest, session, models)

    def cnn_probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N,H,W,3) -> the CNN's class probabilities (N,C)."""
        x = to_model_input(images, self.manifest.preprocessing)
        (probs,) = self.session.run([self.manifest.cnn.output_name], {self.manifest.cnn.input_name: x})
        return probs.astype(np.float64)

    def predict_components(
        self, images: np.ndarray, meta: Sequence[ClinicalMetadata], cnn_probs: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Every model's probabilities for a batch: name -> (N,C)."""
        if cnn_probs is None:
            cnn_probs = self.cnn_probs(images)
        feats = build_features(cnn_probs, meta, image_stats(images), self.manifest.feature_spec)
        probs = {"cnn": cnn_probs}
        for name in LEVEL1_MODELS[1:]:
            probs[name] = self.models[name].predict_proba(feats).astype(np.float64)
        probs["soft_vote"] = soft_vote(probs)
        probs["stack"] = self.models["stack"].predict_proba(stack_inputs(probs)).astype(np.float64)
        return probs

    def predict(self, images: np.ndarray, meta: Sequence[ClinicalMetadata]) -> list[Prediction]:
        comps = self.predict_components(images, meta)
        return [Prediction({k: v[i] for k, v in comps.items()}) for i in range(len(images))]
