"""Generalized task arithmetic: the pieces shared by task_arithmetic, ties, dare_*, breadcrumbs*
and della* (arXiv:2212.04089, 2306.01708, 2311.03099, 2403.13257, 2406.11617).

For one output tensor with base B and the non-base inputs X_i (config order):

    d_i = X_i - B                          float32 task vectors
    d_i' = sparsify(d_i; per-model params) each method's own sparsifier (ops.sparsify)
    M = combine(d_i', w_i, consensus, normalize)   (ops.consensus)
    out = B + lambda * M                   cast to the output dtype

Task vectors: an input whose shape differs from the base is cropped to the base's shape for
embeddings (``architecture.layout.is_embedding_name``) and skipped
with a warning otherwise. With no task vector left the base is returned.

``lambda`` is a global parameter (default 1) on every GTA method, as in mergekit 0.1.5.
Normalizing by weights that sum to zero does not divide (no inf/NaN); a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..architecture.layout import is_embedding_name
from ..errors import MergeError
from ..kernels import GtaSpec, Rescale, Sparsity
from .base import GtaSpecBuilder, MergeInputs, ParamSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_warned: set[tuple[str, ...]] = set()


def _warn_once(key: tuple[str, ...], msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


# ---------------------------------------------------------------- parameters
WEIGHT = ParamSpec("weight", float, required=True, help="weight of this model's task vector")
DENSITY = ParamSpec("density", float, default=1.0, minimum=0.0, maximum=1.0, help="fraction of the task vector kept")
LAMBDA = ParamSpec("lambda", float, default=1.0, help="scale of the merged task vector")
INT8_MASK = ParamSpec("int8_mask", bool, default=False, help="accepted for compatibility; no effect")


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default=default, help="divide the merged task vector by the sum of the weights")


def rescale_param(default: bool, what: str) -> ParamSpec:
    return ParamSpec("rescale", bool, default=default, help=what)


RESCALE_L1 = ParamSpec(
    "rescale_l1",
    bool,
    default=False,
    help="rescale kept values to keep the L1 norm (mergekit 0.1.5) instead of dividing by the keep probability",
)


def check_rescale_l1(params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
    if params.get("rescale_l1") and not params.get("rescale"):
        raise ValueError("'rescale_l1: true' chooses how kept values are rescaled and needs 'rescale: true'")


def random_rescale(params: dict[str, Any]) -> Rescale:
    """How DARE and DELLA rescale the kept values under these params."""
    if not params.get("rescale"):
        return "none"
    return "l1" if params.get("rescale_l1") else "inverse"


# ---------------------------------------------------------------- the merge
def task_vectors(inputs: MergeInputs) -> list[tuple[int, torch.Tensor]]:
    """``(position, X_i - B)`` in float32 for every usable non-base input, in order."""
    import torch

    from ..ops.reduce import weighted_sum

    base = inputs.base
    out = []
    for i, x in enumerate(inputs.tensors):
        if x.shape != base.shape:
            if (
                is_embedding_name(inputs.name)
                and x.dim() == base.dim()
                and all(a >= b for a, b in zip(x.shape, base.shape))
            ):
                x = x[tuple(slice(0, s) for s in base.shape)]
            else:
                _warn_once(
                    ("shape", inputs.name, str(i)),
                    "%s: model %d has shape %s but the base has %s; it is left out of this tensor",
                    inputs.name,
                    i,
                    list(x.shape),
                    list(base.shape),
                )
                continue
        out.append((i, weighted_sum([x, base], [1.0, -1.0], torch.float32)))
    return out


def _finish(result: torch.Tensor, inputs: MergeInputs) -> torch.Tensor:
    out_dtype = inputs.out_dtype or inputs.base.dtype
    if result is inputs.out:
        return result
    if (
        inputs.out is not None
        and inputs.out.device == result.device
        and inputs.out.shape == result.shape
        and inputs.out.dtype == out_dtype
    ):
        return inputs.out.copy_(result)
    return result.to(out_dtype)


def spec_builder(
    sparsity: Callable[[int, dict[str, Any], dict[str, Any], str], Sparsity],
    consensus: bool,
    lam: Callable[[dict[str, Any], list[dict[str, Any]]], float] | None = None,
) -> GtaSpecBuilder:
    """A GTA method's ``compute``: ``sparsity(position, model params, global params, tensor name)``
    gives each non-base input's sparsifier; ``lam`` the scale (default: the global ``lambda``)."""

    def spec(params: dict[str, Any], model_params: list[dict[str, Any]], name: str) -> GtaSpec:
        return GtaSpec(
            sparsity=tuple(sparsity(i, mp, params, name) for i, mp in enumerate(model_params)),
            weights=tuple(float(mp["weight"]) for mp in model_params),
            consensus=consensus,
            normalize=bool(params.get("normalize", False)),
            lam=lam(params, model_params) if lam is not None else float(params.get("lambda", 1.0)),
        )

    return GtaSpecBuilder(spec)


def sparsify(d: torch.Tensor, spec: Sparsity, seed: int) -> torch.Tensor:
    """One task vector sparsified as ``spec`` says (the torch reference of the fused kernel)."""
    from ..ops import sparsify as S

    if spec.kind == "none":
        return d
    if spec.kind == "magnitude":
        return S.magnitude(d, spec.density, rescale=spec.rescale == "l1")
    if spec.kind == "outliers":
        return S.magnitude_outliers(d, spec.density, spec.gamma, rescale=spec.rescale == "l1")
    if spec.kind == "random":
        return S.random_mask(d, spec.density, seed, spec.key, rescale=spec.rescale)
    return S.della(d, spec.density, spec.epsilon, seed, spec.key, rescale=spec.rescale)


def warn_zero_sum(name: str, spec: GtaSpec) -> None:
    from ..ops.consensus import NORMALIZE_EPS, weight_sum

    if spec.normalize and not spec.consensus and abs(weight_sum(list(spec.weights))) < NORMALIZE_EPS:
        _warn_once(("zero-sum", name), "weights for %s sum to zero; the task vectors are summed unnormalized", name)


def gta_reference(inputs: MergeInputs, spec: GtaSpec) -> torch.Tensor:
    """base + lambda * combine(sparsified task vectors) in torch; see the module docstring.
    The fused native kernel (``kernels.Gta``) computes the same bits on CPU."""
    from ..ops.consensus import combine

    base = inputs.base
    if base is None:
        raise MergeError(f"tensor '{inputs.name}': this merge method needs a base model")
    if not base.is_floating_point():
        # integer buffers (position ids, masks) are copied, never merged
        if all(t.shape == base.shape and bool((t == base).all()) for t in inputs.tensors):
            return base.to(inputs.out_dtype or base.dtype)
        raise MergeError(
            f"tensor '{inputs.name}' has dtype {base.dtype} and differs between the models; integer tensors cannot be merged"
        )
    vectors = task_vectors(inputs)
    if not vectors:
        return _finish(base.float(), inputs)
    deltas = [sparsify(d, spec.sparsity[i], inputs.seed) for i, d in vectors]
    weights = [spec.weights[i] for i, _ in vectors]
    del vectors
    warn_zero_sum(inputs.name, replace(spec, weights=tuple(weights)))
    merged = combine(deltas, weights, spec.consensus, spec.normalize)
    del deltas
    if spec.lam != 1.0:
        merged.mul_(spec.lam)
    merged.add_(base.float())
    return _finish(merged, inputs)


def all_checks(*checks: Callable[[dict[str, Any], list[dict[str, Any]]], None]):
    def validate(params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        for check in checks:
            check(params, model_params)

    return validate
