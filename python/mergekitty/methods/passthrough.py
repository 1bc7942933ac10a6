"""Passthrough: copy the single input tensor, optionally scaled. Used for frankenmerges."""

from __future__ import annotations

from .base import LinearCoefficients, MergeMethod, ParamSpec


def coefficients(params, model_params, name):
    scale = model_params[0].get("scale")
    return 0.0, [1.0 if scale is None else float(scale)]


METHOD = MergeMethod(
    name="passthrough",
    pretty_name="Passthrough",
    paper_url=None,
    compute=LinearCoefficients(coefficients),
    model_params=(ParamSpec("scale", float, default=None, help="multiply the tensor by this factor"),),
    base="ignored",
    min_models=1,
    max_models=1,
    description="Copies tensors unchanged (optionally scaled); for layer stacking.",
)
