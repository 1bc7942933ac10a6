"""DELLA (arXiv:2406.11617): drop task-vector elements at random with a keep probability that
grows with their magnitude rank (MagPrune), rescale the survivors by 1/p; ``della`` merges with
TIES sign election, ``della_linear`` with a plain weighted sum.

    d_i  = X_i - B
    per row (last dimension, length m): r = ascending rank of |d| (ties by index)
    p = (density_i - epsilon_i) + 2 epsilon_i * r / (m - 1)
    keep element j when uniform(seed, "<tensor>#<i>", j) < p_j
    d_i' = d_i * keep / p                  (rescale: true, the default — the DELLA paper, as mergekitty 0.3)
    d_i' = d_i * keep * |d_i|_1/|d_i*keep|_1   (rescale_l1: true — mergekit 0.1.5's choice)
    M = combine(d_i', w_i)                 della: TIES sign election (normalize: true by default);
                                           della_linear: sum_i w_i d_i' (normalize: false by default)
    out = B + lambda * M

Parameters: per model ``weight`` (required), ``density`` (default 1: nothing dropped),
``epsilon`` (default 0.15); each model with 0 < density < 1 needs density - epsilon > 0 and
density + epsilon <= 1 (checked before anything is read). Global ``normalize``, ``rescale``
(default true), ``rescale_l1`` (default false), ``int8_mask`` (accepted, no effect).

``lambda`` (default 1) is accepted globally (mergekit) and per model (mergekitty 0.3): when the
first model of the tensor sets a per-model ``lambda`` it wins over the global one; other
models' per-model values are ignored, as in mergekitty 0.3.
"""

from __future__ import annotations

from typing import Any

from ..kernels import Sparsity, stream_key
from . import gta
from .base import MergeMethod, ParamSpec

EPSILON = ParamSpec("epsilon", float, default=0.15, minimum=0.0, help="spread of the keep probabilities around density")
MODEL_LAMBDA = ParamSpec(
    "lambda",
    float,
    default=None,
    help="scale of the merged task vector (the first model's value wins over the global one)",
)


def magprune(i: int, mp: dict[str, Any], params: dict[str, Any], name: str) -> Sparsity:
    return Sparsity(
        "della",
        density=float(mp["density"]),
        epsilon=float(mp["epsilon"]),
        key=stream_key(name, i),
        rescale=gta.random_rescale(params),
    )


def first_model_lambda(params: dict[str, Any], model_params: list[dict[str, Any]]) -> float:
    first = model_params[0].get("lambda") if model_params else None
    return float(first) if first is not None else float(params.get("lambda", 1.0))


def check_epsilon(params, model_params) -> None:
    from ..ops.sparsify import check_della

    for mp in model_params:
        check_della(mp["density"], mp["epsilon"])


def _method(name: str, pretty: str, consensus: bool, normalize: bool, description: str) -> MergeMethod:
    return MergeMethod(
        name=name,
        pretty_name=pretty,
        paper_url="https://arxiv.org/abs/2406.11617",
        compute=gta.spec_builder(magprune, consensus=consensus, lam=first_model_lambda),
        global_params=(
            gta.normalize_param(normalize),
            gta.rescale_param(True, "divide each kept value by its keep probability"),
            gta.RESCALE_L1,
            gta.LAMBDA,
            gta.INT8_MASK,
        ),
        model_params=(gta.WEIGHT, gta.DENSITY, EPSILON, MODEL_LAMBDA),
        base="required",
        random=True,
        validate=gta.all_checks(gta.check_rescale_l1, check_epsilon),
        description=description,
    )


DELLA = _method(
    "della",
    "DELLA",
    True,
    True,
    "Drops task-vector elements at random, keeping large ones more often, and merges with TIES sign election.",
)
DELLA_LINEAR = _method(
    "della_linear",
    "DELLA Linear",
    False,
    False,
    "DELLA's magnitude-ranked random drop, then a weighted sum of the task vectors.",
)
