"""How unlike the training images an upload is, from the CNN's own outputs.

Two scores, both "higher = less like the training data":
- mahalanobis: the squared Mahalanobis distance of the CNN's embedding (its penultimate,
  globally pooled features) to the nearest class mean, with one covariance shared by the classes
  (Lee et al. 2018), fitted on the served model's training images;
- energy: minus the log-sum-exp of the logits (Liu et al. 2020); needs no fitted parameters.

Training fits both on out-of-fold images (each fold model scoring the lesions it never saw, with
its Gaussian fitted on the lesions it trained on) and stores, per method, the threshold that
flags a chosen share of real images. `python -m benchmarks.bench_ood` measures which separates
real lesions from other pictures better; the bundle serves the method named in its manifest.
"""

from __future__ import annotations

import io

import numpy as np
from pydantic import BaseModel, Field

METHODS = ("mahalanobis", "energy")


class OodSpec(BaseModel):
    """The bundle's out-of-distribution score: which one, and where it flags."""

    method: str = Field(description=f"one of {', '.join(METHODS)}; higher scores are less like the training images")
    thresholds: dict[str, float] = Field(description="per method: scores above it are flagged")
    flag_share: float = Field(description="share of out-of-fold real training images above the threshold, by design")
    file: str = Field(description="bundle file (.npz) with the Mahalanobis class means and shared precision")

    @property
    def threshold(self) -> float:
        """The served method's threshold."""
        return self.thresholds[self.method]

    def flags(self, score: float) -> bool:
        return score > self.threshold


class GaussianFit(BaseModel, arbitrary_types_allowed=True):
    means: np.ndarray  # (C, D)
    precision: np.ndarray  # (D, D)

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, means=self.means.astype(np.float32), precision=self.precision.astype(np.float32))
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> GaussianFit:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(means=z["means"].astype(np.float64), precision=z["precision"].astype(np.float64))


def fit_gaussian(embeddings: np.ndarray, y: np.ndarray, n_classes: int) -> GaussianFit:
    """Class means and the shrunk (Ledoit-Wolf) shared covariance of the class-centred embeddings.

    A class with no rows gets the overall mean, so it never becomes the nearest by accident."""
    from sklearn.covariance import LedoitWolf

    e = embeddings.astype(np.float64)
    overall = e.mean(axis=0)
    means = np.stack([e[y == c].mean(axis=0) if (y == c).any() else overall for c in range(n_classes)])
    centred = e - means[y]
    return GaussianFit(means=means, precision=LedoitWolf(assume_centered=True).fit(centred).precision_)


def mahalanobis(embeddings: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """Squared distance to the nearest class mean: (N,)."""
    d = embeddings.astype(np.float64)[:, None, :] - fit.means[None]  # (N, C, D)
    return ((d @ fit.precision) * d).sum(axis=-1).min(axis=1)


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits): (N,)."""
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def scores(method: str, embeddings: np.ndarray, logits: np.ndarray, fit: GaussianFit | None) -> np.ndarray:
    if method == "mahalanobis":
        if fit is None:
            raise ValueError("the mahalanobis score needs the fitted class means and precision")
        return mahalanobis(embeddings, fit)
    if method == "energy":
        return energy(logits)
    raise ValueError(f"unknown out-of-distribution method {method!r}; one of {', '.join(METHODS)}")
