"""Cheap checks of an upload's image quality, each a warning for the person reading the answer.

Thresholds were set on the 2,118 real HAM10000 images of the sample so that real dermoscopy
images are almost never flagged (tests/core/test_explain.py counts how many are). They are measured at
the model's input size, on a whole request at once, in the thread that decoded it (off the event
loop and the model's thread).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DARK, BRIGHT = 0.12, 0.92  # mean luminance in [0, 1]
UNIFORM = 0.02  # luminance standard deviation
BLURRED = 1e-4  # variance of the Laplacian of the luminance at BLUR_WIDTH, in [0,1] units
BLUR_WIDTH = 64  # px: measured at one scale, so the threshold holds for every model input size


def luminance(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float luminance in [0, 1] (ITU-R BT.601 weights), (..., H, W)."""
    return images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0


def laplacian_variance(lum: np.ndarray) -> np.ndarray:
    """(N, H, W) luminance -> (N,): the variance of its Laplacian, block-averaged down to about
    BLUR_WIDTH pixels wide first."""
    n, height, width = lum.shape
    f = max(1, width // BLUR_WIDTH)
    h, w = height // f * f, width // f * f
    lum = lum[:, :h, :w].reshape(n, h // f, f, w // f, f).mean(axis=(2, 4))
    lap = lum[:, 1:-1, :-2] + lum[:, 1:-1, 2:] + lum[:, :-2, 1:-1] + lum[:, 2:, 1:-1] - 4 * lum[:, 1:-1, 1:-1]
    return lap.reshape(n, -1).var(axis=1)


def quality_warnings(
    images: np.ndarray, original_sizes: Sequence[tuple[int, int] | None], model_size: tuple[int, int]
) -> list[list[str]]:
    """Warnings for each image of a batch at the model's input size (uint8 N,H,W,3); `original_sizes`
    are each upload's (w, h) as sent, or None. Vectorised: a batch of 32 costs about what one did."""
    lum = luminance(images).reshape(len(images), -1)
    means, stds = lum.mean(axis=1), lum.std(axis=1)
    blur = laplacian_variance(lum.reshape(images.shape[:3]))
    out: list[list[str]] = []
    for size, mean, std, lap in zip(original_sizes, means.tolist(), stds.tolist(), blur.tolist()):
        found = []
        if size is not None and min(size) < min(model_size):
            w, h = size
            found.append(
                f"low resolution: the image is {w}x{h} pixels, smaller than the model's "
                f"{model_size[0]}x{model_size[1]} input"
            )
        if std < UNIFORM:
            found.append(f"nearly uniform: the image has almost no contrast (luminance std {std:.3f})")
        elif lap < BLURRED:
            found.append("blurred: the image has almost no fine detail")
        if mean < DARK:
            found.append(f"too dark: mean brightness {mean:.2f} of 1")
        elif mean > BRIGHT:
            found.append(f"too bright: mean brightness {mean:.2f} of 1")
        out.append(found)
    return out
