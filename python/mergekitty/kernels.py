"""The kernels a plan can choose for a tensor job, as plain frozen values.

The planner decides, for every job, which kernel computes it (``choose`` in plan.py); the
executor only dispatches on the choice. Every value here is data: it can be printed by
``mergekitty plan``, compared in tests and written as JSON (plan_json.py) for another process
to execute.

- ``Copy``: one input written unchanged (same dtype): straight from the memory map.
- ``LinearCombination``: ``sum_k c_k x_k`` over the job's inputs (base first when it has a
  coefficient), one fused native pass accumulating in float32.
- ``Gta``: generalized task arithmetic (ties, dare_*, della*, breadcrumbs*) as a ``GtaSpec``:
  one fused native pass from the maps (``ops.native_dispatch.gta_merge_views``).
- ``MethodKernel``: the method's own native function (``TorchFunction.native``: the geometric
  methods' Gram + grouped-sum passes, nearswap, sce, arcee_fusion) from the maps.
- ``Torch``: the method's torch function (the reference): GPUs, pickled or computed inputs,
  methods with no native kernel. ``reason`` says why the native kernels do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .methods.base import MergeMethod

SparsityKind = Literal["none", "magnitude", "outliers", "random", "della"]
Rescale = Literal["none", "inverse", "l1"]


@dataclass(frozen=True)
class Sparsity:
    """One model's sparsifier in a GTA merge (definitions in docs/kernels.md).

    ``kind``: "none"; "magnitude" (``density``); "outliers" (Breadcrumbs: ``density``,
    ``gamma``); "random" (DARE: ``density``, random stream ``key``); "della" (``density``,
    ``epsilon``, ``key``). ``rescale``: "none"; "inverse" (random/della: divide the kept values
    by their keep probability); "l1" (keep each task vector's L1 norm: a whole-tensor sum, which
    the native path takes in a first pass).
    """

    kind: SparsityKind
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    key: str = ""
    rescale: Rescale = "none"


NO_SPARSITY = Sparsity("none")


def stream_key(tensor: str, position: int) -> str:
    """The key of the random stream of a tensor's ``position``-th non-base input (docs/kernels.md)."""
    return f"{tensor}#{position}"


@dataclass(frozen=True)
class GtaSpec:
    """A whole GTA merge of one tensor: ``out = base + lam * combine(sparsify_i(x_i - base), w_i)``.

    One ``Sparsity`` and weight per non-base input, in config order; ``consensus`` is TIES sign
    election; ``normalize`` divides by the (elected) weights' sum, by 1 where it is zero."""

    sparsity: tuple[Sparsity, ...]
    weights: tuple[float, ...]
    consensus: bool
    normalize: bool
    lam: float

    @property
    def native(self) -> bool:
        """Whether the fused native kernel computes this spec (an L1 rescale takes it a first
        pass per rescaled model: ``ops.native_dispatch._l1_scales``)."""
        return bool(self.sparsity)


@dataclass(frozen=True)
class Copy:
    """Job input ``input`` (an index into ``TensorJob.inputs``) written as it is."""

    input: int
    name = "native.copy"


@dataclass(frozen=True)
class CopyIfEqual:
    """A tensor that is not a float (position ids, masks): every input must hold the same bytes,
    and input ``input`` is written; inputs that differ are an error (integers are never averaged)."""

    input: int
    name = "native.copy_if_equal"


@dataclass(frozen=True)
class LinearCombination:
    """``(input index, coefficient)`` terms over ``TensorJob.inputs`` (base first when present)."""

    terms: tuple[tuple[int, float], ...]
    name = "native.linear_combination"


@dataclass(frozen=True)
class Gta:
    spec: GtaSpec
    name = "native.gta"


@dataclass(frozen=True)
class MethodKernel:
    """The merge method's own native CPU function (``methods.base.TorchFunction.native``)."""

    method: str

    @property
    def name(self) -> str:
        return f"native.{self.method}"


@dataclass(frozen=True)
class Torch:
    reason: str
    name = "torch"


Kernel = Copy | CopyIfEqual | LinearCombination | Gta | MethodKernel | Torch


@dataclass(frozen=True)
class JobInput:
    """What the kernel choice needs to know of one job input (base first, then the sources)."""

    dtype: str  # safetensors code
    shape: tuple[int, ...]
    mapped: bool  # readable straight from a memory map (not pickled, not computed from an adapter)


UNMAPPED = Torch("an input is pickled or computed")
NOT_FLOAT = Torch("not a float16/bfloat16/float32 tensor")


def _native_floats(inputs: list[JobInput], out_dtype: str) -> bool:
    """Whether the native kernels read every input and write the output in its dtype."""
    from .io.dtypes import NATIVE_FLOAT_CODES

    return out_dtype in NATIVE_FLOAT_CODES and all(i.dtype in NATIVE_FLOAT_CODES for i in inputs)


def _integers(inputs: list[JobInput], shape: tuple[int, ...], out_dtype: str) -> bool:
    """Whether the job copies a non-float tensor that every input holds in one dtype and shape."""
    from .io.dtypes import FLOAT_CODES

    return (
        out_dtype not in FLOAT_CODES
        and all(i.dtype == out_dtype and i.shape == shape and i.mapped for i in inputs)
        and not out_dtype.startswith("F")  # sub-byte and 8-bit floats are not integers either
    )


def choose(
    method: MergeMethod,
    name: str,
    params: dict[str, Any],
    model_params: list[dict[str, Any]],
    inputs: list[JobInput],
    has_base: bool,
    shape: tuple[int, ...],
    out_dtype: str,
    aligned: bool,
    device: str,
) -> Kernel:
    """The kernel that computes one output tensor: native wherever the method declares a native
    form and the inputs are mapped float tensors on CPU, else the method's torch function."""
    from .methods.base import GtaSpecBuilder, LinearCoefficients, TorchFunction

    if device != "cpu":
        return Torch(f"device {device}")
    if aligned:  # every input is re-laid out in the output vocabulary's rows first
        inputs = [JobInput(i.dtype, shape, i.mapped) for i in inputs]
    if _integers(inputs, shape, out_dtype):
        return CopyIfEqual(0)
    compute = method.compute
    if isinstance(compute, LinearCoefficients):
        base_coef, coefs = compute.coefficients(params, model_params, name)
        terms = [(i + int(has_base), float(c)) for i, c in enumerate(coefs)]
        if has_base and (base_coef != 0.0 or not terms):
            terms.insert(0, (0, float(base_coef)))
        used = [inputs[i] for i, _ in terms]
        if not all(u.mapped for u in used):
            return UNMAPPED
        if len(terms) == 1 and terms[0][1] == 1.0 and used[0].dtype == out_dtype:
            return Copy(terms[0][0])
        return LinearCombination(tuple(terms)) if _native_floats(used, out_dtype) else NOT_FLOAT
    if isinstance(compute, GtaSpecBuilder):
        spec = compute.spec(params, model_params, name)
        if has_base and len(inputs) == 1 and inputs[0].mapped:  # only the base: it passes through
            if inputs[0].dtype == out_dtype:
                return Copy(0)
            return LinearCombination(((0, 1.0),)) if _native_floats(inputs, out_dtype) else NOT_FLOAT
        if not has_base or len(inputs) < 2:
            return Torch("no task vector")
        if any(i.shape != shape for i in inputs) or math.prod(shape) == 0:
            return Torch("inputs of another shape")
        if not all(i.mapped for i in inputs):
            return UNMAPPED
        return Gta(spec) if _native_floats(inputs, out_dtype) else NOT_FLOAT
    if isinstance(compute, TorchFunction) and compute.native is not None:
        if any(i.shape != shape for i in inputs):
            return Torch("inputs of another shape")
        if not all(i.mapped for i in inputs):
            return UNMAPPED
        return MethodKernel(method.name) if _native_floats(inputs, out_dtype) else NOT_FLOAT
    return Torch(f"{method.name} has no native kernel")
