"""What a merge method is: its parameters, its checks, and how it computes a tensor (declared, not run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MergeError

if TYPE_CHECKING:
    import torch

    from ..kernels import GtaSpec


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method reads, with its type, default and allowed range."""

    name: str
    kind: type = float  # float, int or bool
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def check(self, value: Any) -> Any:
        """Coerce ``value`` to this parameter's kind; raise ValueError naming the problem. A string
        is read as the other tools' schemas read it: a number ("0.5", "1e-5"), or for a flag
        true/false, yes/no, on/off, 1/0."""
        if value is None:
            return None
        if isinstance(value, str):
            value = self._from_string(value)
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and float(value) in (0.0, 1.0):
                return bool(value)
            raise ValueError(f"'{self.name}' must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{self.name}' must be a number, got {value!r}")
        if self.kind is int:
            if float(value) != int(value):
                raise ValueError(f"'{self.name}' must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"'{self.name}' must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"'{self.name}' must be <= {self.maximum}, got {value}")
        return value

    def _from_string(self, text: str) -> bool | float:
        word = text.strip().lower()
        if self.kind is bool:
            if word in ("true", "yes", "on", "1"):
                return True
            if word in ("false", "no", "off", "0"):
                return False
            raise ValueError(f"'{self.name}' must be true or false, got the string {text!r}")
        try:
            number = float(word)
        except ValueError:
            raise ValueError(f"'{self.name}' must be a number, got the string {text!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"'{self.name}' must be a finite number, got the string {text!r}")
        return number


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method sees for one output tensor.

    ``tensors`` are the non-base inputs in config order, ``model_params`` the
    resolved per-model parameters in the same order, ``base`` the base tensor
    (None when the method does not use one). ``out_dtype`` is the dtype the
    result will be written in: a method may return it directly to save a cast.
    """

    name: str
    tensors: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    base: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    threads: int = 0
    out: torch.Tensor | None = None  # a CPU buffer of the output's shape and dtype the method may fill
    seed: int = 0  # for random methods: draws are a function of (seed, f"{name}#{model position}", element index)

    def stream_key(self, model_position: int) -> str:
        """The key of the random stream of the ``model_position``-th non-base input (see docs/kernels.md)."""
        from ..kernels import stream_key

        return stream_key(self.name, model_position)


# (global params, per-model params, tensor name) -> (base coefficient, one coefficient per model)
Coefficients = Callable[[dict[str, Any], list[dict[str, Any]], str], tuple[float, list[float]]]
# (global params, per-model params, tensor name) -> the whole GTA merge of that tensor
GtaSpecOf = Callable[[dict[str, Any], list[dict[str, Any]], str], "GtaSpec"]


@dataclass(frozen=True)
class LinearCoefficients:
    """The result is a fixed linear combination of the inputs (linear, task_arithmetic,
    passthrough): a native weighted sum on CPU, ``linear_merge`` in torch."""

    coefficients: Coefficients


@dataclass(frozen=True)
class GtaSpecBuilder:
    """Generalized task arithmetic (ties, dare_*, della*, breadcrumbs*) described as a
    ``kernels.GtaSpec``: the fused native kernel on CPU, ``methods.gta.gta_reference`` in torch."""

    spec: GtaSpecOf


@dataclass(frozen=True)
class NativeInputs:
    """What a method's native CPU function sees for one output tensor.

    ``inputs`` are the job's inputs as raw little-endian buffers (memory-map views): the base
    first when the method uses one, then the other models in config order; ``dtypes`` their
    codes ("BF16", "F16", "F32"), all of one element count. ``out`` is the writable buffer of
    the result in ``out_dtype``. The function returns the ``_native.TensorHealth`` of the
    inputs (in this order) and of the output."""

    name: str
    inputs: list[Any]
    dtypes: list[str]
    has_base: bool
    shape: tuple[int, ...]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    out: Any
    out_dtype: str
    threads: int = 0

    @property
    def models(self) -> int:
        """The number of non-base inputs."""
        return len(self.inputs) - int(self.has_base)


@dataclass(frozen=True)
class TorchFunction:
    """A method computed by its own functions rather than a linear or GTA declaration.

    ``merge`` is the torch function: the reference of the native kernels and the GPU path.
    ``native``, when the method has one, computes a tensor on CPU from the memory maps without
    torch (``NativeInputs``); the planner chooses it wherever the inputs allow.
    ``working_copies``: how many float32 copies of the tensor the torch function holds at once,
    as (per input, fixed); ``native_copies``: the same for the native function (fixed), or a
    function of the global parameters giving it. The plan's memory estimate (memory.py) reads them."""

    merge: Callable[[MergeInputs], torch.Tensor]
    working_copies: tuple[float, float] = (2.0, 2.0)
    native: Callable[[NativeInputs], Any] | None = None
    native_copies: float | Callable[[dict[str, Any]], float] = 0.0


# How a method computes a tensor; the planner turns it into each job's kernel (plan.choose_kernel).
Computation = LinearCoefficients | GtaSpecBuilder | TorchFunction


def linear_merge(coefficients: Coefficients, inputs: MergeInputs) -> torch.Tensor:
    """The torch implementation of a method whose result is a fixed linear combination of its inputs."""
    from ..ops.reduce import weighted_sum

    base_coef, coefs = coefficients(inputs.params, inputs.model_params, inputs.name)
    tensors, weights = list(inputs.tensors), list(coefs)
    if inputs.base is not None and (base_coef != 0.0 or not tensors):
        tensors.insert(0, inputs.base)
        weights.insert(0, base_coef)
    out_dtype = inputs.out_dtype or tensors[0].dtype
    if not tensors[0].is_floating_point():
        # integer buffers (position ids, masks) are copied, never averaged
        if all(t.shape == tensors[0].shape and bool((t == tensors[0]).all()) for t in tensors[1:]):
            return tensors[0].to(out_dtype)
        raise MergeError(
            f"tensor '{inputs.name}' has dtype {tensors[0].dtype} and differs between the models; integer tensors cannot be averaged"
        )
    return weighted_sum(tensors, weights, out_dtype, inputs.threads, out=inputs.out)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: what it reads and how it computes, as declarations.

    ``base`` says how the base model is used: "required", "optional" or
    "ignored" (then a base model, if given, is merged like any other input).
    ``compute`` says how a tensor is computed; the planner chooses each job's kernel from it.
    """

    name: str
    pretty_name: str
    paper_url: str | None
    compute: Computation
    global_params: tuple[ParamSpec, ...] = ()
    model_params: tuple[ParamSpec, ...] = ()
    base: str = "ignored"
    min_models: int = 1
    max_models: int | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    random: bool = False  # draws random numbers: the merge records its seed
    # Checks that involve several parameters (e.g. density +- epsilon inside (0, 1]); called at
    # plan time for every tensor with the resolved values; raises ValueError naming the problem.
    validate: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
    # For a method whose base is "optional": whether these global parameters make it required
    # (slerp with 't' interpolates from the base); returns the reason, or None.
    base_needed_for: Callable[[dict[str, Any]], str | None] | None = None

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """The torch computation of one tensor: the reference of the native kernels and the GPU path."""
        compute = self.compute
        if isinstance(compute, LinearCoefficients):
            return linear_merge(compute.coefficients, inputs)
        if isinstance(compute, GtaSpecBuilder):
            from .gta import gta_reference

            spec = compute.spec(inputs.params, list(inputs.model_params), inputs.name)
            return gta_reference(inputs, spec)
        return compute.merge(inputs)

    def param_spec(self, name: str) -> ParamSpec | None:
        for spec in (*self.global_params, *self.model_params):
            if spec.name == name:
                return spec
        return None
