"""Unpickling a bundle's models through an allow-list: defence in depth behind the sha256 check.

A pickle can name any importable callable (`os.system`, `builtins.eval`, ...) and have it called
while loading. This unpickler resolves only what the bundle's models need: estimator and booster
classes of the libraries the manifest lists, numpy's array machinery and a few plain containers.
Model classes may only be *rebuilt* (created empty, then given their saved state), never *called*
with arguments a pickle chooses (a booster's constructor opens whatever file path it is given);
only numpy's reconstructors and plain containers may be called. Anything else stops the load with
a BundleError naming what was asked for.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Iterable
from typing import Any

from service.core.errors import BundleError

CALLABLE = {  # may be called while loading (pickle's REDUCE): they build data, nothing else
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
}
NUMPY = {("numpy", "dtype"), ("numpy", "ndarray")} | {
    (m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray") for n in ("_reconstruct", "scalar")
}
IMPORT_NAMES = {"scikit-learn": "sklearn"}  # distribution -> import name, where they differ
MODEL_BASES = [  # what a model object (or a part of one) may be, or derive from
    "sklearn.base:BaseEstimator",
    "xgboost.core:Booster",
    "lightgbm.basic:Booster",
    "catboost.core:CatBoost",
]


def _resolve(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class AllowListUnpickler(pickle._Unpickler):  # the Python implementation, so REDUCE can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, libraries: Iterable[str], what: str) -> None:
        super().__init__(file)
        roots = {IMPORT_NAMES.get(lib, lib).replace("-", "_") for lib in libraries}
        self.bases = tuple(_resolve(b) for b in MODEL_BASES if b.split(".")[0] in roots)
        self.roots, self.what = roots, what
        self.callable_ids: set[int] = set()

    def refuse(self, what: str) -> BundleError:
        return BundleError(f"{self.what} asks to {what}, which no model of this bundle needs: refusing it")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in CALLABLE or ((module, name) in NUMPY and "numpy" in self.roots):
            obj = super().find_class(module, name)
            self.callable_ids.add(id(obj))
            return obj
        root = module.split(".")[0]
        if root in self.roots and root != "numpy" and self.bases:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and issubclass(obj, self.bases):
                return obj
        raise self.refuse(f"load {module}.{name}")

    def load_reduce(self) -> None:
        func = self.stack[-2]  # type: ignore[attr-defined]  # the Python unpickler's working stack
        if id(func) not in self.callable_ids:
            raise self.refuse(f"call {getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    dispatch[pickle.REDUCE[0]] = load_reduce  # type: ignore[assignment]


def load_model(data: bytes, libraries: Iterable[str], what: str) -> Any:
    """Unpickle one model, admitting only what `libraries` (the manifest's list for it) need."""
    try:
        return AllowListUnpickler(io.BytesIO(data), libraries, what).load()
    except BundleError:
        raise
    except Exception as exc:  # a corrupt pickle, or one the libraries installed cannot read
        raise BundleError(f"{what} cannot be loaded: {type(exc).__name__}: {exc}") from None
