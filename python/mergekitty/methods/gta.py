"""Generalized task arithmetic: the pieces shared by task_arithmetic, ties, dare_*, breadcrumbs*
and della* (arXiv:2212.04089, 2306.01708, 2311.03099, 2403.13257, 2406.11617).

For one output tensor with base B and the non-base inputs X_i (config order):

    d_i = X_i - B                          float32 task vectors
    d_i' = sparsify(d_i; per-model params) each method's own sparsifier (ops.sparsify)
    M = combine(d_i', w_i, consensus, normalize)   (ops.consensus)
    out = B + lambda * M                   cast to the output dtype

Task vectors: an input whose shape differs from the base is cropped to the base's shape for
embeddings (names containing embed_tokens / lm_head / wte / embed_in / embed_out) and skipped
with a warning otherwise. With no task vector left the base is returned.

``lambda`` is a global parameter (default 1) on every GTA method, as in mergekit 0.1.5.
Normalizing by weights that sum to zero does not divide (no inf/NaN); a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import MergeInputs, ParamSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EMBED_MARKERS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
_warned: set[tuple[str, ...]] = set()

# (task vector, index of the model among the non-base inputs, its resolved per-model params) -> sparsified
Sparsifier = Callable[["torch.Tensor", int, dict[str, Any], MergeInputs], "torch.Tensor"]


@dataclass(frozen=True)
class Sparsity:
    """One model's sparsifier as data, for the fused CPU kernel (``ops.native_dispatch.gta_merge``).

    ``kind``: "none"; "magnitude" (``density``); "outliers" (Breadcrumbs: ``density``, ``gamma``);
    "random" (DARE: ``density``, stream ``key``) or "della" (``density``, ``epsilon``, ``key``).
    ``rescale``: for random/della, divide the kept values by their keep probability. The L1
    rescales have no ``Sparsity`` (a method's ``fused`` returns None and the unfused path runs).
    """

    kind: str
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    key: str = ""
    rescale: bool = False


NO_SPARSITY = Sparsity("none")

# (index of the model among the non-base inputs, its resolved per-model params, inputs) -> its Sparsity,
# or None when only the unfused path can run it
FusedSparsifier = Callable[[int, dict[str, Any], MergeInputs], "Sparsity | None"]

# Tests switch this off to run the unfused (reference) path.
FUSED_ENABLED = True


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


def random_rescale(params: dict[str, Any]) -> str:
    """The ``rescale`` argument of ops.sparsify.random_mask / della for these params."""
    if not params.get("rescale"):
        return "none"
    return "l1" if params.get("rescale_l1") else "inverse"


# ---------------------------------------------------------------- the merge
def is_embedding(name: str) -> bool:
    return any(m in name for m in EMBED_MARKERS)


def task_vectors(inputs: MergeInputs) -> list[tuple[int, torch.Tensor]]:
    """``(position, X_i - B)`` in float32 for every usable non-base input, in order."""
    import torch

    from ..ops.reduce import weighted_sum

    base = inputs.base
    out = []
    for i, x in enumerate(inputs.tensors):
        if x.shape != base.shape:
            if is_embedding(inputs.name) and x.dim() == base.dim() and all(a >= b for a, b in zip(x.shape, base.shape)):
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


def lambda_of(inputs: MergeInputs) -> float:
    return float(inputs.params.get("lambda", 1.0))


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


def _check_zero_sum(inputs: MergeInputs, weights: list[float], consensus: bool, normalize: bool) -> None:
    from ..ops.consensus import NORMALIZE_EPS, weight_sum

    if normalize and not consensus and abs(weight_sum(weights)) < NORMALIZE_EPS:
        _warn_once(
            ("zero-sum", inputs.name),
            "weights for %s sum to zero; the task vectors are summed unnormalized",
            inputs.name,
        )


@dataclass(frozen=True)
class FusedGta:
    """A whole GTA merge of one tensor as data, for the fused native kernel: one ``Sparsity``
    and weight per non-base input, and the global switches."""

    specs: tuple[Sparsity, ...]
    weights: tuple[float, ...]
    consensus: bool
    normalize: bool
    lam: float


def describe_fused(
    inputs: MergeInputs, fused: FusedSparsifier, consensus: bool, lam: float | None = None
) -> FusedGta | None:
    """The merge ``inputs`` asks for as a ``FusedGta`` (reads the parameters, the name and the
    seed; never the tensors), or None when a model's sparsifier cannot be fused."""
    specs = tuple(fused(i, mp, inputs) for i, mp in enumerate(inputs.model_params))
    if not specs or any(s is None for s in specs):
        return None
    weights = tuple(float(mp["weight"]) for mp in inputs.model_params)
    normalize = bool(inputs.params.get("normalize", False))
    return FusedGta(specs, weights, consensus, normalize, lambda_of(inputs) if lam is None else lam)


def warn_zero_sum(inputs: MergeInputs, plan: FusedGta) -> None:
    _check_zero_sum(inputs, list(plan.weights), plan.consensus, plan.normalize)


def _fused_merge(inputs: MergeInputs, plan: FusedGta) -> torch.Tensor | None:
    """The whole merge in the fused native kernel (CPU, F32/F16/BF16, every input of the base's
    shape), or None."""
    from ..ops.native_dispatch import gta_merge as native_gta_merge

    base = inputs.base
    if base.device.type != "cpu" or not inputs.tensors or any(x.shape != base.shape for x in inputs.tensors):
        return None
    out_dtype = inputs.out_dtype or base.dtype
    result = native_gta_merge(
        inputs.tensors,
        base,
        plan.specs,
        plan.weights,
        plan.consensus,
        plan.normalize,
        plan.lam,
        inputs.seed,
        out_dtype,
        inputs.out,
    )
    if result is not None:
        warn_zero_sum(inputs, plan)
    return result


def gta_merge(
    inputs: MergeInputs,
    sparsify: Sparsifier | None,
    consensus: bool,
    lam: float | None = None,
    fused: FusedSparsifier | None = None,
) -> torch.Tensor:
    """base + lambda * combine(sparsified task vectors); see the module docstring.

    ``fused`` describes each model's sparsifier as a :class:`Sparsity`; when given (and the
    inputs allow it) the merge runs in one native pass over the inputs (``_fused_merge``) with the
    same result as the unfused path below, which stays the reference and the GPU path."""
    from ..ops.consensus import combine
    from ..ops.native_dispatch import combine_into_base

    base = inputs.base
    if base is None:
        raise ValueError(f"tensor '{inputs.name}': this merge method needs a base model")
    if not base.is_floating_point():
        # integer buffers (position ids, masks) are copied, never merged
        if all(t.shape == base.shape and bool((t == base).all()) for t in inputs.tensors):
            return base.to(inputs.out_dtype or base.dtype)
        raise ValueError(
            f"tensor '{inputs.name}' has dtype {base.dtype} and differs between the models; integer tensors cannot be merged"
        )
    normalize = bool(inputs.params.get("normalize", False))
    lam = lambda_of(inputs) if lam is None else lam
    if fused is not None and FUSED_ENABLED:
        plan = describe_fused(inputs, fused, consensus, lam)
        result = _fused_merge(inputs, plan) if plan is not None else None
        if result is not None:
            return _finish(result, inputs)
    vectors = task_vectors(inputs)
    if not vectors:
        return _finish(base.float(), inputs)
    deltas, weights = [], []
    for i, d in vectors:
        mp = inputs.model_params[i]
        deltas.append(sparsify(d, i, mp, inputs) if sparsify is not None else d)
        weights.append(float(mp["weight"]))
    del vectors
    _check_zero_sum(inputs, weights, consensus, normalize)
    fused = combine_into_base(
        deltas, weights, consensus, normalize, lam, base, inputs.out_dtype or base.dtype, inputs.out
    )
    if fused is not None:  # CPU: one native pass from the task vectors and the mmapped base to the output dtype
        return _finish(fused, inputs)
    merged = combine(deltas, weights, consensus, normalize)
    del deltas
    if lam != 1.0:
        merged.mul_(lam)
    merged.add_(base.float())
    return _finish(merged, inputs)


def method_functions(
    sparsify: Sparsifier | None,
    consensus: bool,
    lam: Callable[[MergeInputs], float] | None = None,
    fused: FusedSparsifier | None = None,
) -> dict[str, Any]:
    """The ``merge`` and ``fused_gta`` fields of a GTA method's ``MergeMethod``. ``fused``: the
    same sparsifier as a ``Sparsity`` per model (implied when ``sparsify`` is None)."""
    if sparsify is None and fused is None:
        fused = lambda i, mp, inputs: NO_SPARSITY  # noqa: E731

    def merge(inputs: MergeInputs) -> torch.Tensor:
        return gta_merge(inputs, sparsify, consensus, lam(inputs) if lam is not None else None, fused)

    def describe(inputs: MergeInputs) -> FusedGta | None:
        if not FUSED_ENABLED:
            return None
        return describe_fused(inputs, fused, consensus, lam(inputs) if lam is not None else None)

    return {"merge": merge, "fused_gta": describe}


def all_checks(*checks: Callable[[dict[str, Any], list[dict[str, Any]]], None]):
    def validate(params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        for check in checks:
            check(params, model_params)

    return validate
