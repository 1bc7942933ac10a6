"""Model Breadcrumbs (arXiv:2312.06795): drop both the largest (outliers) and the smallest
changes of each task vector; ``breadcrumbs_ties`` adds TIES sign election.

    d_i  = X_i - B
    d_i' = magnitude_outliers(d_i, density_i, gamma_i)
           the n_top = floor(gamma*n) largest |d| are dropped, then the smallest, so that
           max(1, floor(density*n)) remain (docs/kernels.md)
    M = combine(d_i', w_i)                 breadcrumbs: sum_i w_i d_i'; breadcrumbs_ties: TIES sign election
    out = B + lambda * M

Parameters: per model ``weight`` (required), ``density`` (default 1), ``gamma`` (default 0.01);
global ``normalize`` (default false), ``rescale`` (default false: when true the kept values are
L1-rescaled), ``lambda`` (default 1), ``int8_mask`` (accepted, no effect). Unlike mergekitty 0.3
(and mergekit before 0.1.5) a tensor with fewer than 1/gamma elements (norms, biases) is not
zeroed: when floor(gamma*n) is 0 nothing is dropped from the top.
"""

from __future__ import annotations

from typing import Any

from ..kernels import Sparsity
from . import gta
from .base import MergeMethod, ParamSpec

GAMMA = ParamSpec(
    "gamma", float, default=0.01, minimum=0.0, maximum=1.0, help="fraction of the largest-magnitude changes dropped"
)


def crumbs(i: int, mp: dict[str, Any], params: dict[str, Any], name: str) -> Sparsity:
    rescale = "l1" if params.get("rescale") else "none"
    return Sparsity("outliers", density=float(mp["density"]), gamma=float(mp["gamma"]), rescale=rescale)


def _method(name: str, pretty: str, consensus: bool, description: str) -> MergeMethod:
    return MergeMethod(
        name=name,
        pretty_name=pretty,
        paper_url="https://arxiv.org/abs/2312.06795",
        compute=gta.spec_builder(crumbs, consensus=consensus),
        global_params=(
            gta.normalize_param(False),
            gta.rescale_param(False, "L1-rescale the kept values of each task vector"),
            gta.LAMBDA,
            gta.INT8_MASK,
        ),
        model_params=(gta.WEIGHT, gta.DENSITY, GAMMA),
        base="required",
        description=description,
    )


BREADCRUMBS = _method(
    "breadcrumbs",
    "Model Breadcrumbs",
    False,
    "Drops the largest and the smallest changes of each model and adds the weighted rest to the base.",
)
BREADCRUMBS_TIES = _method(
    "breadcrumbs_ties",
    "Model Breadcrumbs with TIES",
    True,
    "Breadcrumbs sparsification merged with TIES sign election.",
)
