"""DARE (arXiv:2311.03099): drop each task-vector element at random and rescale the survivors;
``dare_ties`` then merges with TIES sign election, ``dare_linear`` with a plain weighted sum.

    d_i  = X_i - B
    keep element j of model i when uniform(seed, "<tensor>#<i>", j) < density_i
    d_i' = d_i * keep / density_i          (rescale: true, the default — the DARE paper, as mergekitty 0.3)
    d_i' = d_i * keep * |d_i|_1/|d_i*keep|_1   (rescale_l1: true — mergekit 0.1.5's choice)
    M = combine(d_i', w_i)                 dare_ties: TIES sign election; dare_linear: sum_i w_i d_i'
                                           (divided by the weights' sum when normalize: true)
    out = B + lambda * M

Parameters: per model ``weight`` (required), ``density`` (default 1: nothing dropped); global
``normalize`` (default false), ``rescale`` (default true), ``rescale_l1`` (default false),
``lambda`` (default 1), ``int8_mask`` (accepted, no effect). The draws are the counter-based
generator of docs/kernels.md, so a merge with the same ``random_seed`` is bit-identical on
every device.
"""

from __future__ import annotations

from typing import Any

from ..kernels import Sparsity, stream_key
from . import gta
from .base import MergeMethod


def drop(i: int, mp: dict[str, Any], params: dict[str, Any], name: str) -> Sparsity:
    return Sparsity("random", density=float(mp["density"]), key=stream_key(name, i), rescale=gta.random_rescale(params))


def _method(name: str, pretty: str, consensus: bool, description: str) -> MergeMethod:
    return MergeMethod(
        name=name,
        pretty_name=pretty,
        paper_url="https://arxiv.org/abs/2311.03099",
        compute=gta.spec_builder(drop, consensus=consensus),
        global_params=(
            gta.normalize_param(False),
            gta.rescale_param(True, "divide the kept values by density"),
            gta.RESCALE_L1,
            gta.LAMBDA,
            gta.INT8_MASK,
        ),
        model_params=(gta.WEIGHT, gta.DENSITY),
        base="required",
        random=True,
        validate=gta.check_rescale_l1,
        description=description,
    )


DARE_TIES = _method(
    "dare_ties",
    "DARE TIES",
    True,
    "Drops random task-vector elements, rescales the rest, and merges them with TIES sign election.",
)
DARE_LINEAR = _method(
    "dare_linear",
    "DARE Linear",
    False,
    "Drops random task-vector elements, rescales the rest, and adds their weighted sum to the base.",
)
