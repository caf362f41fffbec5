"""How unlike the training images an upload is, from the CNN's own outputs.

Two scores, both "higher = less like the training data":
- mahalanobis: the squared Mahalanobis distance of the CNN's embedding (its penultimate,
  globally pooled features) to the nearest class mean, with one covariance shared by the classes
  (Lee et al. 2018), fitted on the served model's training images;
- energy: minus the log-sum-exp of the logits (Liu et al. 2020); needs no fitted parameters.

Beside the CNN's score, an image-statistics check that needs no CNN: the squared Mahalanobis
distance of a few low-level statistics of the model-size image (colour, texture, colour variety;
`image_statistics`) to those of the training images. Screenshots, documents and photographs of
other things differ from dermoscopy there even where the CNN's embedding does not tell them apart
(a web page's screenshot once scored below the CNN's threshold). An upload is flagged when either
score is above its threshold.

Training fits both on out-of-fold images (each fold model scoring the lesions it never saw, with
its Gaussian fitted on the lesions it trained on) and stores, per method, the threshold that
flags a chosen share of real images (with the image check, the two together flag that share). `python -m benchmarks.bench_ood` measures which separates
real lesions from other pictures better; the bundle serves the method named in its manifest.
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np
from pydantic import BaseModel, Field, model_validator

from service.core.features import image_stats
from service.core.quality import luminance

METHODS = ("mahalanobis", "energy")
IMAGE_CHECK = "image_statistics"


class OodSpec(BaseModel):
    """The bundle's out-of-distribution score: which one, and where it flags."""

    method: str = Field(description=f"one of {', '.join(METHODS)}; higher scores are less like the training images")
    thresholds: dict[str, float] = Field(
        description="per method: scores above it are flagged (all at the quantile set for the served method with "
        "the image check, so a method not served would flag a little under flag_share alone)"
    )
    flag_share: float = Field(
        ge=0, le=1, description="share of out-of-fold real training images above the threshold, by design"
    )
    file: str = Field(description="bundle file (.npz) with the Mahalanobis class means and shared precision")
    image_threshold: float | None = Field(
        None, description="image-statistics scores above it are flagged (None: bundles before it have no such check)"
    )
    image_file: str | None = Field(None, description="bundle file (.npz): the image statistics' mean and precision")
    fitted_on: str | None = Field(
        None, description="the fold graphs whose held-out scores set the thresholds: the CNN and the precision served"
    )

    @model_validator(mode="after")
    def _served_method_has_a_finite_threshold(self) -> OodSpec:
        if self.method not in METHODS:
            raise ValueError(f"unknown out-of-distribution method {self.method!r}; one of {', '.join(METHODS)}")
        if self.method not in self.thresholds:
            raise ValueError(f"no threshold for the served method {self.method}")
        if not all(math.isfinite(t) for t in [*self.thresholds.values(), self.image_threshold or 0.0]):
            raise ValueError("every out-of-distribution threshold must be a finite number")
        if (self.image_threshold is None) != (self.image_file is None):
            raise ValueError("the image-statistics check needs both its threshold and its file")
        return self

    @property
    def threshold(self) -> float:
        """The served method's threshold."""
        return self.thresholds[self.method]

    def flagged_by(self, score: float, image_score: float | None = None) -> list[str]:
        """Which checks flag an upload: the served method (its score from the CNN) and "image_statistics"."""
        out = [self.method] if score > self.threshold else []
        if self.image_threshold is not None and image_score is not None and image_score > self.image_threshold:
            out.append(IMAGE_CHECK)
        return out


class GaussianFit(BaseModel, arbitrary_types_allowed=True):
    means: np.ndarray  # (C, D)
    precision: np.ndarray  # (D, D)

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, means=self.means.astype(np.float32), precision=self.precision.astype(np.float32))
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes, n_classes: int) -> GaussianFit:
        """Read and check a fit: (C, D) means and a (D, D) symmetric precision with a positive
        diagonal, every value finite (a NaN would make every score NaN and switch the flag off).
        Raises ValueError, saying what is wrong."""
        arrays = read_npz(data, ("means", "precision"))
        means, precision = arrays["means"].astype(np.float64), arrays["precision"].astype(np.float64)
        if means.ndim != 2 or means.shape[0] != n_classes or precision.shape != (means.shape[1],) * 2:
            raise ValueError(f"means {means.shape} and precision {precision.shape} must be ({n_classes}, D) and (D, D)")
        if not (np.isfinite(means).all() and np.isfinite(precision).all()):
            raise ValueError("the class means and the precision must be finite numbers")
        if (np.diag(precision) <= 0).any() or not np.allclose(precision, precision.T, rtol=1e-4, atol=1e-6):
            raise ValueError("the precision matrix must be symmetric with a positive diagonal")
        return cls(means=means, precision=precision)


MAX_NPZ_BYTES = 64 * 1024 * 1024  # a 512-dimensional fit is about 1 MB


def read_npz(data: bytes, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of an .npz, each read only after its header's size is checked against the
    bytes it really holds (numpy's own reader allocates what the header declares first)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = {i.filename.removesuffix(".npy"): i for i in z.infolist()}
        if set(infos) != set(names):
            raise ValueError(f"holds {sorted(infos)}, not {list(names)}")
        if sum(i.file_size for i in infos.values()) > MAX_NPZ_BYTES:
            raise ValueError(f"its arrays are over {MAX_NPZ_BYTES} bytes")
        out = {}
        for name, info in infos.items():
            f = io.BytesIO(z.read(info))  # zipfile stops at the declared size and checks the CRC
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject or dtype.kind not in "fiu":
                raise ValueError(f"{name} has dtype {dtype}, not numbers")
            count = math.prod(shape)
            if count * dtype.itemsize != len(f.getbuffer()) - f.tell():
                raise ValueError(f"{name}'s header says {shape} {dtype}, which is not the data it holds")
            flat = np.frombuffer(f.getbuffer(), dtype, count, offset=f.tell())
            out[name] = flat.reshape(shape, order="F" if fortran else "C")
        return out


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Low-level statistics of uint8 images (N,H,W,3) at the model's input size: (N, 21) float64.

    Colour: RGB means and stds, saturation mean and std, opponent chroma (red-green, yellow-blue)
    means and stds. Texture: the log mean luminance gradient, the shares of flat (< 0.002) and
    hard-edged (> 0.15) neighbours, and the log ratios of the gradient at 1x/2x and 2x/4x
    (a crop blown up, or a page of text, has its detail at other scales than a dermoscopy image).
    Variety: the entropy of a 512-colour histogram (screenshots use few colours). The shares of
    near-white and near-black pixels, and the corners' luminance against the centre's. Computed 256
    images at a time: its float copies of a whole training set would not fit in memory."""
    if len(images) > 256:
        return np.concatenate([image_statistics(images[i : i + 256]) for i in range(0, len(images), 256)])
    n = len(images)
    f = images.astype(np.float32) / 255.0
    rgb = f.reshape(n, -1, 3)
    # per-pixel max and min of the channels by elementwise maximum: numpy's reductions over a last
    # axis of 3 took two thirds of this function's time
    hi = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    lo = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
    lum = luminance(images)
    grad = np.concatenate([np.abs(np.diff(lum, axis=2)).reshape(n, -1), np.abs(np.diff(lum, axis=1)).reshape(n, -1)], 1)
    top = (images >> 5).reshape(n, -1, 3).astype(np.int16)  # 8 levels per channel: 512 colours
    codes = top[..., 0] * 64 + top[..., 1] * 8 + top[..., 2]
    shares = np.stack([np.bincount(c, minlength=512) for c in codes]) / codes.shape[1]
    entropy = -(shares * np.log(np.where(shares > 0, shares, 1.0))).sum(axis=1)
    red_green, yellow_blue = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    g1, g2, g4 = (np.log(mean_gradient(pooled(lum, k)) + 1e-4) for k in (1, 2, 4))
    h, w = lum.shape[1:]
    corners = (
        np.stack(
            [
                lum[:, sy, sx]
                for sy in (slice(0, h // 4), slice(-(h // 4), None))
                for sx in (slice(0, w // 4), slice(-(w // 4), None))
            ],
            1,
        )
        .reshape(n, -1)
        .mean(axis=1)
    )
    centre = lum[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean(axis=(1, 2))
    return np.column_stack(
        [
            image_stats(images),  # the RGB means and stds, as the boosters read them
            sat.mean(axis=1),
            sat.std(axis=1),
            red_green.mean(axis=1),
            yellow_blue.mean(axis=1),
            red_green.std(axis=1),
            yellow_blue.std(axis=1),
            np.log(grad.mean(axis=1) + 1e-4),
            (grad < 0.002).mean(axis=1),
            (grad > 0.15).mean(axis=1),
            entropy,
            (lo > 0.92).mean(axis=1),
            (hi < 0.08).mean(axis=1),
            g1 - g2,
            g2 - g4,
            corners - centre,
        ]
    ).astype(np.float64)


def pooled(lum: np.ndarray, k: int) -> np.ndarray:
    """(N,H,W) averaged over k x k blocks (as a sum of the k*k strided views: a mean over the
    small axes of a reshape was 10x slower)."""
    if k == 1:
        return lum
    h, w = lum.shape[1] // k * k, lum.shape[2] // k * k
    total = np.zeros_like(lum[:, 0:h:k, 0:w:k])
    for i in range(k):
        for j in range(k):
            total += lum[:, i:h:k, j:w:k]
    return total / np.float32(k * k)


def mean_gradient(lum: np.ndarray) -> np.ndarray:
    return 0.5 * (np.abs(np.diff(lum, axis=2)).mean(axis=(1, 2)) + np.abs(np.diff(lum, axis=1)).mean(axis=(1, 2)))


def fit_image_gaussian(stats: np.ndarray) -> GaussianFit:
    """One Gaussian over image statistics (N, D): the Ledoit-Wolf covariance of the standardised
    statistics (their scales differ by orders of magnitude), folded back to the raw ones, as a
    one-class fit: `mahalanobis(image_statistics(x), fit)` is the image check's score. A statistic
    that hardly varies in training is given a spread of at least 0.01, so it cannot flag everything."""
    from sklearn.covariance import LedoitWolf

    centre, scale = stats.mean(axis=0), np.maximum(stats.std(axis=0), 1e-2)
    lw = LedoitWolf().fit((stats - centre) / scale)
    precision = lw.precision_ / scale[:, None] / scale[None, :]
    return GaussianFit(means=(centre + lw.location_ * scale)[None], precision=(precision + precision.T) / 2)


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
