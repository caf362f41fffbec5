"""Unpickling a bundle's models through an allow-list: defence in depth behind the sha256 check.

A pickle can name any importable callable (`os.system`, `builtins.eval`, ...) and have it called
while loading. This unpickler resolves only what the bundle's models need: estimator and booster
classes of the libraries the manifest lists, numpy's array machinery and a few plain containers.
Anything else stops the load with a BundleError naming what was asked for.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Iterable
from typing import Any

from service.core.errors import BundleError

PLAIN = {
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}
NUMPY = {("numpy", "dtype"), ("numpy", "ndarray")} | {
    (m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray") for n in ("_reconstruct", "scalar")
}
IMPORT_NAMES = {"scikit-learn": "sklearn"}  # distribution -> import name, where they differ
MODEL_BASES = {  # import name -> the classes a model object of that library may be (or derive from)
    "sklearn": ["sklearn.base:BaseEstimator"],
    "xgboost": ["xgboost.core:Booster", "sklearn.base:BaseEstimator"],
    "lightgbm": ["lightgbm.basic:Booster", "sklearn.base:BaseEstimator"],
    "catboost": ["catboost.core:CatBoost"],
}


def _resolve(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, libraries: Iterable[str], what: str) -> None:
        super().__init__(file)
        roots = {IMPORT_NAMES.get(lib, lib).replace("-", "_") for lib in libraries}
        self.bases = tuple(_resolve(b) for root in sorted(roots) for b in MODEL_BASES.get(root, []))
        self.roots, self.what = roots, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PLAIN or ((module, name) in NUMPY and "numpy" in self.roots):
            return super().find_class(module, name)
        if module.split(".")[0] in self.roots and module.split(".")[0] != "numpy":
            obj = super().find_class(module, name)
            if isinstance(obj, type) and self.bases and issubclass(obj, self.bases):
                return obj
        raise BundleError(f"{self.what} asks to load {module}.{name}, which no model of this bundle needs: refusing it")


def load_model(data: bytes, libraries: Iterable[str], what: str) -> Any:
    """Unpickle one model, admitting only what `libraries` (the manifest's list for it) need."""
    return AllowListUnpickler(io.BytesIO(data), libraries, what).load()
