"""Parameter values: gradients across layers, tensor-name filters, and precedence. Pure.

Precedence, highest first (``ParameterResolver``):
1. the parameters of the source (input slice / model) the tensor comes from - per-model
   parameters only;
2. the output slice's ``parameters``;
3. the top-level ``parameters``;
4. unset: ``None`` (the caller applies the method's default or reports a missing value).

A level counts only if it yields a value: a list of conditionals whose filters match
nothing falls through to the next level. Global (method-level) parameters see the
OUTPUT tensor name; per-model parameters see the INPUT tensor name of that model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import (
    ConditionalParameter,
    InputModelDefinition,
    InputSliceDefinition,
    MergeConfiguration,
    OutputSliceDefinition,
)
from .refs import ModelReference

__all__ = ["evaluate", "interpolate_gradient", "filter_matches", "layer_t", "ParameterResolver", "normalize_to_slices"]


def layer_t(idx: int, num_layers: int) -> float:
    """Position of layer ``idx`` in a slice of ``num_layers`` layers: ``idx/(L-1)``, 1.0 when L == 1."""
    if num_layers <= 1:
        return 1.0
    return idx / (num_layers - 1)


def interpolate_gradient(values: list[float], t: float) -> float:
    """Linear interpolation over ``len(values)`` equally spaced knots on [0, 1]."""
    n = len(values)
    t = min(max(float(t), 0.0), 1.0)
    x = t * (n - 1)
    i0 = math.floor(x)
    i1 = min(n - 1, i0 + 1)
    f = x - i0
    return (1 - f) * values[i0] + f * values[i1]


def filter_matches(filter: str | None, tensor_name: str) -> bool:
    """A filter matches when it is None, ``"*"``, or a substring of the tensor name."""
    return filter is None or filter == "*" or (bool(tensor_name) and filter in tensor_name)


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one parameter setting for a tensor at depth ``t`` in [0, 1], or None.

    - a scalar (bool, int, float) is returned as is;
    - a list of numbers is a gradient, interpolated at ``t``;
    - a conditional (or a list of them): the first whose filter matches ``tensor_name``
      is evaluated; None when none matches.
    """
    if setting is None:
        return None
    if isinstance(setting, (bool, int, float)):
        return setting
    if isinstance(setting, ConditionalParameter):
        return evaluate(setting.value, tensor_name, t) if filter_matches(setting.filter, tensor_name) else None
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return interpolate_gradient(list(setting), t)
        for cond in setting:
            if isinstance(cond, ConditionalParameter) and filter_matches(cond.filter, tensor_name):
                return evaluate(cond.value, tensor_name, t)
        return None
    raise TypeError(f"unexpected parameter setting {setting!r}")


def _lookup(params: Mapping[str, Any] | None, name: str, tensor_name: str, t: float) -> Any:
    if not params or name not in params:
        return None
    return evaluate(params[name], tensor_name, t)


class ParameterResolver:
    """Resolves parameter values by precedence for a MergeConfiguration.

    ``slice_idx`` and ``source_idx`` index the normalized slices (``normalize_to_slices``):
    for a ``models:`` config there is one slice (index 0) whose sources are the models in
    config order, then the base model if it was appended (which has no parameters).
    """

    def __init__(self, config: MergeConfiguration) -> None:
        self.config = config

    def _slice_params(self, slice_idx: int) -> Mapping[str, Any] | None:
        if self.config.slices is not None:
            return self.config.slices[slice_idx].parameters
        return None

    def _source_params(self, slice_idx: int, source_idx: int) -> Mapping[str, Any] | None:
        sources: Sequence[InputSliceDefinition | InputModelDefinition]
        if self.config.slices is not None:
            sources = self.config.slices[slice_idx].sources
        else:
            sources = self.config.models or []
        if 0 <= source_idx < len(sources):
            return sources[source_idx].parameters
        return None  # the appended base model

    def _places(self, slice_idx: int, source_idx: int | None) -> list[tuple[Mapping[str, Any] | None, tuple[Any, ...]]]:
        """(parameters, their config key path) in precedence order."""
        out: list[tuple[Mapping[str, Any] | None, tuple[Any, ...]]] = []
        if source_idx is not None:
            where = (
                ("slices", slice_idx, "sources", source_idx)
                if self.config.slices is not None
                else ("models", source_idx)
            )
            out.append((self._source_params(slice_idx, source_idx), (*where, "parameters")))
        if self.config.slices is not None:
            out.append((self._slice_params(slice_idx), ("slices", slice_idx, "parameters")))
        out.append((self.config.parameters, ("parameters",)))
        return out

    def origin(self, name: str, slice_idx: int, source_idx: int | None, tensor_name: str, t: float) -> tuple[Any, ...]:
        """The config key path the value of ``name`` comes from (for error messages with a line)."""
        for params, where in self._places(slice_idx, source_idx):
            if _lookup(params, name, tensor_name, t) is not None:
                return (*where, name)
        return ("parameters", name)

    def global_value(self, name: str, slice_idx: int, out_tensor_name: str, t: float) -> Any:
        """A method-level parameter for an output tensor: slice, then top level; None if unset."""
        for params in (self._slice_params(slice_idx), self.config.parameters):
            value = _lookup(params, name, out_tensor_name, t)
            if value is not None:
                return value
        return None

    def model_value(self, name: str, slice_idx: int, source_idx: int, in_tensor_name: str, t: float) -> Any:
        """A per-model parameter for one source's input tensor: source, slice, then top level; None if unset."""
        for params in (
            self._source_params(slice_idx, source_idx),
            self._slice_params(slice_idx),
            self.config.parameters,
        ):
            value = _lookup(params, name, in_tensor_name, t)
            if value is not None:
                return value
        return None


def normalize_to_slices(
    config: MergeConfiguration, num_layers: Callable[[ModelReference], int]
) -> list[OutputSliceDefinition]:
    """The config's output slices (no validation: ``num_layers`` is trusted); a ``models:`` config becomes one slice covering
    ``[0, num_layers(model))`` of each model, in order, with the base model appended as an
    extra source without parameters when it is not among the models."""
    if config.slices is not None:
        return list(config.slices)
    sources = [
        InputSliceDefinition.model_construct(
            model=m.model, layer_range=(0, num_layers(m.model)), parameters=m.parameters
        )
        for m in config.models or ()
    ]
    base = config.base_model
    if base is not None and all(m.model != base for m in config.models or ()):
        sources.append(
            InputSliceDefinition.model_construct(model=base, layer_range=(0, num_layers(base)), parameters=None)
        )
    return [
        OutputSliceDefinition.model_construct(sources=sources, base_model=None, residual_weight=None, parameters=None)
    ]
