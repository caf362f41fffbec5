"""Probabilities for a stated population.

Every model of the stack is trained with balanced class weights, so its probabilities are those
of a population where the seven classes are equally common: rare malignant classes are pushed up.
Bayes' rule moves them to another population's class prevalence pi:

    p_pi(c) ∝ p(c)^(1/T) * pi(c)

(the balanced model's own prior is uniform, so it divides out). T is an optional temperature fitted
on out-of-fold predictions (1 when fitting it did not help). Named priors: "balanced" (uniform,
the models as trained) and "training" (the class shares of the bundle's training data, HAM10000's
own for a HAM10000 run); a request may also give its own prevalences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np

from service.core.errors import PriorError

EPS = 1e-12
NamedPrior = Literal["balanced", "training"]  # the named class priors (the manifest's default_prior)
NAMED: tuple[str, ...] = get_args(NamedPrior)


def prior_vector(
    prior: str | Mapping[str, float], classes: Sequence[str], training_prevalence: Mapping[str, float]
) -> np.ndarray:
    """A named prior or {class: prevalence} (every class, positive, normalised here) -> (C,) summing to 1."""
    if prior == "balanced":
        return np.full(len(classes), 1.0 / len(classes))
    if prior == "training":
        prior = training_prevalence
    if isinstance(prior, str):
        raise PriorError(f"unknown prior {prior!r}: use {' or '.join(NAMED)}, or a JSON object of class prevalences")
    unknown = sorted(set(prior) - set(classes))
    missing = [c for c in classes if c not in prior]
    if unknown or missing:
        raise PriorError(
            f"a prior needs a prevalence for each of {', '.join(classes)} (missing {missing}, unknown {unknown})"
        )
    values = [prior[c] for c in classes]
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        raise PriorError("prior prevalences must be numbers")
    try:
        v = np.array([float(x) for x in values], np.float64)
    except OverflowError:  # an integer too large for a float
        raise PriorError("prior prevalences must be positive, finite numbers") from None
    if not np.isfinite(v).all() or (v <= 0).any():
        raise PriorError("prior prevalences must be positive, finite numbers")
    v = v / v.max()  # no overflow when summing huge values
    return v / v.sum()


def adjust(probs: np.ndarray, prior: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Balanced-model probabilities (N,C) -> probabilities under `prior`, after the temperature."""
    logp = np.log(np.clip(probs, EPS, 1.0)) / temperature + np.log(np.clip(prior, EPS, 1.0))
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)
