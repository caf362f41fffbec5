"""What drove one answer: a class activation heatmap over the image, and how much each group of
inputs moved each booster (the boosters' own TreeSHAP, summed per group).

Both are computed only when a request asks (`explain=true`): the heatmap needs the graph's
'cam' output, the attributions one TreeSHAP pass per booster.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import io
from typing import Any

import numpy as np
from PIL import Image

from service.core.features import FeatureSpec

GROUPS = {"age": "age", "sex_": "sex", "site_": "site", "img_": "colour"}  # and "image": every CNN's probabilities


def feature_groups(spec: FeatureSpec) -> list[str]:
    """The input group of each feature column, in `spec.names` order."""
    groups = {**{f"{cnn}_p_": "image" for cnn in spec.cnns}, **GROUPS}
    return [next(g for prefix, g in groups.items() if name.startswith(prefix)) for name in spec.names]


def tree_shap(model: Any, features: np.ndarray) -> np.ndarray:
    """Per-row, per-class, per-feature contributions to the booster's raw (log-odds) score, plus the
    bias as the last column: (N, C, F+1). Each library's own exact TreeSHAP, found by what the
    model offers (its library is the one that pickled it)."""
    library = importlib.import_module(type(model).__module__.split(".")[0])
    n, f = features.shape
    if hasattr(model, "get_booster"):  # XGBoost
        out = model.get_booster().predict(library.DMatrix(features), pred_contribs=True)
    elif hasattr(model, "get_feature_importance"):  # CatBoost
        out = model.get_feature_importance(data=library.Pool(features), type="ShapValues")
    elif "pred_contrib" in inspect.signature(model.predict).parameters:  # LightGBM
        out = np.asarray(model.predict(features, pred_contrib=True))
    else:
        raise TypeError(f"no TreeSHAP for {type(model).__name__}")
    return np.asarray(out, np.float64).reshape(n, -1, f + 1)


def group_attributions(contribs: np.ndarray, groups: list[str]) -> dict[str, float]:
    """One row's contributions for one class (F+1,) summed per input group, plus the bias."""
    out = {g: 0.0 for g in dict.fromkeys(groups)}
    for g, v in zip(groups, contribs[:-1]):
        out[g] += float(v)
    out["bias"] = float(contribs[-1])
    return out


COLOURS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], np.float32)


def colour_map(x: np.ndarray) -> np.ndarray:
    """[0,1] (H,W) -> uint8 (H,W,3), a jet-like ramp (blue low, red high)."""
    pos = np.clip(x, 0, 1) * (len(COLOURS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(COLOURS) - 2)
    t = (pos - lo)[..., None]
    return ((1 - t) * COLOURS[lo] + t * COLOURS[lo + 1]).astype(np.uint8)


def normalised(cam: np.ndarray) -> np.ndarray:
    """One class's map scaled to [0,1] (all zero when flat)."""
    span = cam.max() - cam.min()
    return (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)


def heat_layer(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map normalised, upsampled (bilinear) to `size` (w, h) and coloured: uint8 (h, w, 3)."""
    up = Image.fromarray((normalised(cam) * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return colour_map(np.asarray(up, np.float32) / 255.0)


def png_base64(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_pngs(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> tuple[str, str]:
    """The map over the model-size image (uint8 H,W,3), blended, and the map alone in its colour
    scale at that size (for a viewer to lay over the original), both as base64 PNG."""
    h, w = image.shape[:2]
    layer = heat_layer(cam, (w, h))
    blended = (1 - alpha) * image.astype(np.float32) + alpha * layer
    return png_base64(blended.astype(np.uint8)), png_base64(layer)


COLOUR_SCALE = ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in c)) for c in COLOURS]  # low -> high, for legends
