"""Task arithmetic (arXiv:2212.04089): add weighted task vectors to the base.

    delta_i = X_i - B
    M = sum_i w_i delta_i             (divided by sum_i w_i when normalize: true)
    out = B + lambda * M

Every step is linear, so the whole merge is one fused weighted sum:
    out = (1 - lambda * sum_i c_i) B + sum_i lambda c_i X_i,   c_i = w_i [/ sum w]
"""

from __future__ import annotations

from .base import LinearCoefficients, MergeMethod, ParamSpec
from .linear import normalized_weights


def coefficients(params, model_params, name):
    weights = [float(p["weight"]) for p in model_params]
    lam = float(params["lambda"])
    coefs = [lam * c for c in normalized_weights(weights, params["normalize"], name)]
    return 1.0 - sum(coefs), coefs


METHOD = MergeMethod(
    name="task_arithmetic",
    pretty_name="Task Arithmetic",
    paper_url="https://arxiv.org/abs/2212.04089",
    compute=LinearCoefficients(coefficients),
    global_params=(
        ParamSpec("normalize", bool, default=False, help="divide the summed task vectors by the sum of the weights"),
        ParamSpec("lambda", float, default=1.0, help="scale of the merged task vector"),
    ),
    model_params=(ParamSpec("weight", float, required=True, help="weight of this model's task vector"),),
    base="required",
    description="Adds weighted task vectors (model minus base) to the base model.",
)
