"""Unpickling a bundle's models through an allow-list: defence in depth behind the sha256 check.

A pickle is a small program: it can name any importable callable (`os.system`, a booster class
whose constructor opens a file path) and have it called with arguments it chooses. This unpickler
runs only the steps model pickles need:
- names resolve only to an exact list of model classes (of the libraries the manifest lists for the
  file), numpy's array reconstructors and a few plain containers; nothing else is even imported;
- only those reconstructors and containers may be *called* (REDUCE); model classes are only
  *rebuilt*: created empty (NEWOBJ, no arguments) and given their saved state by their own class's
  `__setstate__` (BUILD); the protocol-0/1 instantiation opcodes (INST, OBJ) are refused.
No call may ask for a large allocation (`bytearray(10**9)`, an array reconstructed with a huge
shape, a dtype of a huge item size): the sizes those calls take are bounded, and numpy's `ndarray`
may be named but never called, so what a pickle builds is bounded by its own size. What comes out
must be one of the model classes. Anything else stops the load with a BundleError saying what was
asked for.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterable
from typing import Any

from service.core.errors import BundleError

CALLABLE = {  # may be called while loading: they build data, nothing else
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
}
NUMPY = {("numpy", "dtype")} | {  # may be called: reconstructors (their sizes bounded below)
    (m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray") for n in ("_reconstruct", "scalar")
}
NUMPY_NAMES = {("numpy", "ndarray")}  # may be named (the class `_reconstruct` builds), never called
MODELS = {  # what a bundle's model file may hold, at the top
    ("xgboost.sklearn", "XGBClassifier"),
    ("lightgbm.sklearn", "LGBMClassifier"),
    ("catboost.core", "CatBoostClassifier"),
    ("sklearn.pipeline", "Pipeline"),
    ("sklearn.linear_model._logistic", "LogisticRegressionCV"),
}
MODEL_CLASSES = MODELS | {  # the classes a bundle's model objects are made of; rebuilt, never called
    ("xgboost.core", "Booster"),
    ("lightgbm.basic", "Booster"),
    ("sklearn.preprocessing._data", "StandardScaler"),
    ("sklearn.preprocessing._label", "LabelEncoder"),
}
IMPORT_NAMES = {"scikit-learn": "sklearn"}  # distribution -> import name, where they differ
MAX_CALL_SIZE = 1 << 16  # elements a call may ask for: model pickles pass bytes to bytearray and a shape of (0,)

Pickler = pickle._Unpickler  # the Python implementation: its opcodes can be checked one by one


class AllowListUnpickler(Pickler):
    dispatch = dict(Pickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, libraries: Iterable[str], what: str) -> None:
        super().__init__(file)
        self.roots = {IMPORT_NAMES.get(lib, lib).replace("-", "_") for lib in libraries}
        self.what = what
        self.callable_ids: set[int] = set()
        self.class_ids: set[int] = set()

    def refuse(self, what: str) -> BundleError:
        return BundleError(f"{self.what} asks to {what}, which no model of this bundle needs: refusing it")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in CALLABLE or ((module, name) in NUMPY and "numpy" in self.roots):
            obj = super().find_class(module, name)
            self.callable_ids.add(id(obj))
            return obj
        if (module, name) in NUMPY_NAMES and "numpy" in self.roots:
            return super().find_class(module, name)
        if (module, name) in MODEL_CLASSES and module.split(".")[0] in self.roots:
            obj = super().find_class(module, name)
            self.class_ids.add(id(obj))
            return obj
        raise self.refuse(f"load {module}.{name}")

    def load_reduce(self) -> None:  # func(*args)
        func, args = self.stack[-2], self.stack[-1]  # type: ignore[attr-defined]
        name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}"
        if id(func) not in self.callable_ids:
            raise self.refuse(f"call {name}")
        if requested_size(func, args) > MAX_CALL_SIZE:
            raise self.refuse(f"call {name} with a size over {MAX_CALL_SIZE} (a large allocation)")
        Pickler.load_reduce(self)  # type: ignore[attr-defined]

    def check_new(self, cls: Any, args: tuple, kwargs: dict | None = None) -> None:
        if not isinstance(cls, type) or id(cls) not in self.class_ids or args or kwargs:
            raise self.refuse(f"create {getattr(cls, '__qualname__', cls)!r} with arguments {args!r}")

    def load_newobj(self) -> None:  # cls.__new__(cls, *args)
        self.check_new(self.stack[-2], self.stack[-1])  # type: ignore[attr-defined]
        Pickler.load_newobj(self)  # type: ignore[attr-defined]

    def load_newobj_ex(self) -> None:  # cls.__new__(cls, *args, **kwargs)
        self.check_new(self.stack[-3], self.stack[-2], self.stack[-1])  # type: ignore[attr-defined]
        Pickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    def load_build(self) -> None:
        """Give an object its state through its *class's* __setstate__ (never one planted on the instance)."""
        state = self.stack.pop()  # type: ignore[attr-defined]
        inst = self.stack[-1]  # type: ignore[attr-defined]
        if isinstance(inst, type):
            raise self.refuse(f"set the state of the class {inst.__qualname__}")
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None:
            setstate(inst, state)
            return
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if state:
            inst.__dict__.update(state)
        for k, v in (slots or {}).items():
            setattr(inst, k, v)

    def refuse_opcode(self) -> None:
        raise self.refuse("instantiate a class with protocol 0/1 opcodes (INST/OBJ)")

    dispatch[pickle.REDUCE[0]] = load_reduce  # type: ignore[assignment]
    dispatch[pickle.NEWOBJ[0]] = load_newobj  # type: ignore[assignment]
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex  # type: ignore[assignment]
    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]
    dispatch[pickle.INST[0]] = refuse_opcode  # type: ignore[assignment]
    dispatch[pickle.OBJ[0]] = refuse_opcode  # type: ignore[assignment]


def requested_size(func: Any, args: Any) -> int:
    """What a call allocates before the pickle's own bytes fill it: bytearray(n) n bytes, numpy's
    `_reconstruct(cls, shape, dtype)` the product of the shape (times a flexible dtype's size)."""
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(args, tuple):
        return 0
    if qualname == "bytearray":
        return args[0] if args and isinstance(args[0], int) else 0
    if qualname == "_reconstruct" and len(args) >= 2 and isinstance(args[1], tuple):
        shape = [d if isinstance(d, int) else MAX_CALL_SIZE + 1 for d in args[1]]
        return math.prod(abs(d) for d in shape)
    if qualname == "dtype" and args and isinstance(args[0], str):
        digits = "".join(c for c in args[0] if c.isdigit())
        return int(digits[:12]) if digits else 0  # e.g. 'V1000000000': an item size, allocated per element
    return 0


def load_model(data: bytes, libraries: Iterable[str], what: str) -> Any:
    """Unpickle one model, admitting only what `libraries` (the manifest's list for it) need."""
    try:
        model = AllowListUnpickler(io.BytesIO(data), libraries, what).load()
    except BundleError:
        raise
    except Exception as exc:  # a corrupt pickle, or one the libraries installed cannot read
        raise BundleError(f"{what} cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}") from None
    kind = (type(model).__module__, type(model).__qualname__)
    if kind not in MODELS:
        raise BundleError(f"{what} holds a {kind[0]}.{kind[1]}, not a model: refusing it")
    return model
