"""Cheap checks of an upload's image quality, each a warning for the person reading the answer.

Thresholds were set on the 2,118 real HAM10000 images of the sample so that real dermoscopy
images are almost never flagged (tests/test_explain.py counts how many are); they are measured at
the model's input size, so they cost a few microseconds.
"""

from __future__ import annotations

import numpy as np

DARK, BRIGHT = 0.12, 0.92  # mean luminance in [0, 1]
UNIFORM = 0.02  # luminance standard deviation
BLURRED = 1e-4  # variance of the Laplacian of the luminance at BLUR_WIDTH, in [0,1] units
BLUR_WIDTH = 64  # px: measured at one scale, so the threshold holds for every model input size


def luminance(image: np.ndarray) -> np.ndarray:
    """uint8 (H,W,3) -> float luminance in [0, 1] (ITU-R BT.601 weights)."""
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0


def laplacian_variance(lum: np.ndarray) -> float:
    """Of the luminance block-averaged down to about BLUR_WIDTH pixels wide."""
    f = max(1, lum.shape[1] // BLUR_WIDTH)
    h, w = lum.shape[0] // f * f, lum.shape[1] // f * f
    lum = lum[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    lap = lum[1:-1, :-2] + lum[1:-1, 2:] + lum[:-2, 1:-1] + lum[2:, 1:-1] - 4 * lum[1:-1, 1:-1]
    return float(lap.var())


def quality_warnings(
    image: np.ndarray, original_size: tuple[int, int] | None, model_size: tuple[int, int]
) -> list[str]:
    """Warnings for one image at the model's input size (uint8 H,W,3); `original_size` is (w, h) as uploaded."""
    out = []
    if original_size is not None and min(original_size) < min(model_size):
        w, h = original_size
        out.append(
            f"low resolution: the image is {w}x{h} pixels, smaller than the model's {model_size[0]}x{model_size[1]} input"
        )
    lum = luminance(image)
    mean, std = float(lum.mean()), float(lum.std())
    if std < UNIFORM:
        out.append(f"nearly uniform: the image has almost no contrast (luminance std {std:.3f})")
    elif laplacian_variance(lum) < BLURRED:
        out.append("blurred: the image has almost no fine detail")
    if mean < DARK:
        out.append(f"too dark: mean brightness {mean:.2f} of 1")
    elif mean > BRIGHT:
        out.append(f"too bright: mean brightness {mean:.2f} of 1")
    return out
