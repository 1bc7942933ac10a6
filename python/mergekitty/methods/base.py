"""What a merge method is: its parameters and one pure function over tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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
        """Coerce ``value`` to this parameter's kind; raise ValueError naming the problem."""
        if value is None:
            return None
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
        return f"{self.name}#{model_position}"


# (global params, per-model params, tensor name) -> (base coefficient, one coefficient per model)
Coefficients = Callable[[dict[str, Any], list[dict[str, Any]], str], tuple[float, list[float]]]


def linear_merge(coefficients: Coefficients) -> Callable[[MergeInputs], torch.Tensor]:
    """The torch implementation of a method whose result is a fixed linear combination of its inputs."""

    def merge(inputs: MergeInputs) -> torch.Tensor:
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
            raise ValueError(
                f"tensor '{inputs.name}' has dtype {tensors[0].dtype} and differs between the models; integer tensors cannot be averaged"
            )
        return weighted_sum(tensors, weights, out_dtype, inputs.threads, out=inputs.out)

    return merge


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``base`` says how the base model is used: "required", "optional" or
    "ignored" (then a base model, if given, is merged like any other input).
    """

    name: str
    pretty_name: str
    paper_url: str | None
    merge: Callable[[MergeInputs], torch.Tensor]
    global_params: tuple[ParamSpec, ...] = ()
    model_params: tuple[ParamSpec, ...] = ()
    base: str = "ignored"
    min_models: int = 1
    max_models: int | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # Set for methods whose result is a fixed linear combination of the inputs: the
    # executor then runs them as one fused native pass straight from the memory maps.
    coefficients: Coefficients | None = None
    random: bool = False  # draws random numbers: the merge records its seed
    # Checks that involve several parameters (e.g. density +- epsilon inside (0, 1]); called at
    # plan time for every tensor with the resolved values; raises ValueError naming the problem.
    validate: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
    # For a method whose base is "optional": whether these global parameters make it required
    # (slerp with 't' interpolates from the base); returns the reason, or None.
    base_needed_for: Callable[[dict[str, Any]], str | None] | None = None
    # For the GTA family: the merge of one tensor as data (methods.gta.FusedGta; the inputs'
    # tensors are not read) or None, so the executor can run the fused native kernel
    # straight from the memory maps without torch.
    fused_gta: Callable[[MergeInputs], Any] | None = None

    def param_spec(self, name: str) -> ParamSpec | None:
        for spec in (*self.global_params, *self.model_params):
            if spec.name == name:
                return spec
        return None
