"""Linear: a weighted average of the inputs (Model Soups, arXiv:2203.05482).

    out = sum_i w_i X_i            (normalize: false)
    out = sum_i w_i X_i / sum_i w_i (normalize: true, the default)

When the weights sum to zero, normalizing is undefined; instead of returning
inf/NaN as other tools do, the unnormalized sum is used and a warning logged once.
"""

from __future__ import annotations

import logging

from ..ops.consensus import NORMALIZE_EPS
from .base import LinearCoefficients, MergeMethod, ParamSpec

log = logging.getLogger(__name__)
_warned: set[str] = set()


def normalized_weights(weights: list[float], normalize: bool, name: str) -> list[float]:
    """Divide by the sum when asked; a (near-)zero sum leaves the weights as they are."""
    if not normalize:
        return weights
    total = sum(weights)
    if abs(total) < NORMALIZE_EPS:
        if name not in _warned:
            _warned.add(name)
            log.warning("weights for %s sum to zero; using them unnormalized", name)
        return weights
    return [w / total for w in weights]


def coefficients(params, model_params, name):
    weights = [float(p["weight"]) for p in model_params]
    return 0.0, normalized_weights(weights, params["normalize"], name)


METHOD = MergeMethod(
    name="linear",
    pretty_name="Linear",
    paper_url="https://arxiv.org/abs/2203.05482",
    compute=LinearCoefficients(coefficients),
    global_params=(ParamSpec("normalize", bool, default=True, help="divide by the sum of the weights"),),
    model_params=(ParamSpec("weight", float, required=True, help="weight of this model's tensor"),),
    base="ignored",
    description="Weighted average of the inputs.",
)
