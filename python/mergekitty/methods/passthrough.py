"""Passthrough: copy the single input tensor, optionally scaled. Used for frankenmerges."""

from __future__ import annotations

from ..ops.reduce import weighted_sum
from .base import MergeInputs, MergeMethod, ParamSpec


def merge(inputs: MergeInputs):
    (tensor,) = inputs.tensors
    scale = inputs.model_params[0].get("scale")
    out_dtype = inputs.out_dtype or tensor.dtype
    if scale is None and tensor.dtype == out_dtype:
        return tensor
    if not tensor.is_floating_point():
        return tensor.to(out_dtype) if scale is None else (tensor * scale).to(out_dtype)
    return weighted_sum([tensor], [1.0 if scale is None else float(scale)], out_dtype, inputs.threads)


METHOD = MergeMethod(
    name="passthrough",
    pretty_name="Passthrough",
    paper_url=None,
    merge=merge,
    model_params=(ParamSpec("scale", float, default=None, help="multiply the tensor by this factor"),),
    base="ignored",
    min_models=1,
    max_models=1,
    description="Copies tensors unchanged (optionally scaled); for layer stacking.",
)
