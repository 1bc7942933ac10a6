"""TIES-Merging (arXiv:2306.01708): trim, elect sign, disjoint merge.

    d_i  = X_i - B
    d_i' = magnitude(d_i, density_i)      keep the max(1, floor(density*n)) largest |d| (ties at the threshold kept)
    sigma = sign(sum_i w_i d_i')          (+1 on a tie)
    M = sum_{i: sign(w_i d_i') = sigma} w_i d_i'   / sum of those w_i   (normalize: true, the default)
    out = B + lambda * M

Parameters as in mergekit: per model ``weight`` (required) and ``density`` (default 1: no
trimming, i.e. sign-elected task arithmetic); global ``normalize`` (default true), ``rescale``
(default false: when true the kept values are L1-rescaled to the norm of d_i), ``lambda``
(default 1) and ``int8_mask`` (accepted, no effect). Unlike other tools a low density on a tiny
tensor keeps at least one element instead of failing.
"""

from __future__ import annotations

from typing import Any

from ..kernels import Sparsity
from . import gta
from .base import MergeMethod


def trim(i: int, mp: dict[str, Any], params: dict[str, Any], name: str) -> Sparsity:
    return Sparsity("magnitude", density=float(mp["density"]), rescale="l1" if params.get("rescale") else "none")


METHOD = MergeMethod(
    name="ties",
    pretty_name="TIES",
    paper_url="https://arxiv.org/abs/2306.01708",
    compute=gta.spec_builder(trim, consensus=True),
    global_params=(
        gta.normalize_param(True),
        gta.rescale_param(False, "L1-rescale the kept values of each task vector"),
        gta.LAMBDA,
        gta.INT8_MASK,
    ),
    model_params=(gta.WEIGHT, gta.DENSITY),
    base="required",
    description="Keeps the largest-magnitude changes of each model, elects a sign per parameter, and averages the agreeing changes.",
)
