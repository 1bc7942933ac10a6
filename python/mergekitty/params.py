"""Parameter values: gradients across layers, tensor-name filters, and precedence. Pure.

Precedence, highest first (``ParameterResolver``):
1. the parameters of the source (input slice / model) the tensor comes from - per-model
   parameters only;
2. the output slice's ``parameters``;
3. the module's ``parameters`` (``modules.<name>.parameters``, in a ``modules:`` config);
4. the top-level ``parameters``;
5. unset: ``None`` (the caller applies the method's default or reports a missing value).

A level counts only if it yields a value: a list of conditionals whose filters match
nothing falls through to the next level. Global (method-level) parameters see the
OUTPUT tensor name; per-model parameters see the INPUT tensor name of that model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import (
    ConditionalParameter,
    InputModelDefinition,
    InputSliceDefinition,
    MergeConfiguration,
    OutputSliceDefinition,
)
from .refs import ModelReference

__all__ = [
    "evaluate",
    "interpolate_gradient",
    "filter_matches",
    "layer_t",
    "ParameterResolver",
    "SliceGroup",
    "config_groups",
    "group_slices",
    "normalize_to_slices",
]


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

    - a scalar (bool, int, float, or a string as the other tools accept) is returned as is;
    - a list of numbers is a gradient, interpolated at ``t``;
    - a conditional (or a list of them): the first whose filter matches ``tensor_name``
      is evaluated; None when none matches.
    """
    if setting is None:
        return None
    if isinstance(setting, (bool, int, float, str)):
        return setting  # a string is the method's parameter check's to convert (ParamSpec.check)
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


@dataclass(frozen=True)
class SliceGroup:
    """The slices or models of one layer stack as the config writes them: the top-level
    ``slices``/``models``, or those of one module of a ``modules:`` config."""

    module: str | None  # the module's name; None for the top-level slices/models
    slices: tuple[OutputSliceDefinition, ...] | None
    models: tuple[InputModelDefinition, ...] | None
    parameters: Mapping[str, Any] | None  # the module's parameters (precedence level 3)

    @property
    def key(self) -> tuple[Any, ...]:
        """The config key path of the group's ``slices`` or ``models`` list."""
        at: tuple[Any, ...] = ("modules", self.module) if self.module is not None else ()
        return (*at, "slices" if self.slices is not None else "models")

    def slice_key(self, index: int) -> tuple[Any, ...]:
        """The config key path of normalized slice ``index`` (a ``models`` list is one slice)."""
        return (*self.key, index) if self.slices is not None else self.key

    def source_key(self, index: int, source: int) -> tuple[Any, ...]:
        """The config key path of source ``source`` of normalized slice ``index``."""
        return (*self.key, index, "sources", source) if self.slices is not None else (*self.key, source)


def config_groups(config: MergeConfiguration) -> list[SliceGroup]:
    """The config's groups in config order: its modules, else its top-level slices or models."""
    if config.modules is not None:
        return [
            SliceGroup(
                name,
                tuple(m.slices) if m.slices is not None else None,
                tuple(m.models) if m.models is not None else None,
                m.parameters,
            )
            for name, m in config.modules.items()
        ]
    return [
        SliceGroup(
            None,
            tuple(config.slices) if config.slices is not None else None,
            tuple(config.models) if config.models is not None else None,
            None,
        )
    ]


@dataclass(frozen=True)
class _SlicePlaces:
    """Where the parameters of one normalized slice are: (parameters, config key path) of each
    source, then of the slice, its module and the top level, in precedence order."""

    sources: tuple[tuple[Mapping[str, Any] | None, tuple[Any, ...]], ...]
    levels: tuple[tuple[Mapping[str, Any] | None, tuple[Any, ...]], ...]


def _slice_places(config: MergeConfiguration) -> list[_SlicePlaces]:
    """Every normalized slice of the config (``group_slices`` of each group, in order)."""
    out = []
    for group in config_groups(config):
        outer: list[tuple[Mapping[str, Any] | None, tuple[Any, ...]]] = []
        if group.module is not None:
            outer.append((group.parameters, ("modules", group.module, "parameters")))
        outer.append((config.parameters, ("parameters",)))
        if group.slices is not None:
            for i, sl in enumerate(group.slices):
                sources = tuple(
                    (src.parameters, (*group.source_key(i, j), "parameters")) for j, src in enumerate(sl.sources)
                )
                out.append(_SlicePlaces(sources, ((sl.parameters, (*group.slice_key(i), "parameters")), *outer)))
        else:
            models = tuple(
                (m.parameters, (*group.source_key(0, j), "parameters")) for j, m in enumerate(group.models or ())
            )
            out.append(_SlicePlaces(models, tuple(outer)))
    return out


class ParameterResolver:
    """Resolves parameter values by precedence for a MergeConfiguration.

    ``slice_idx`` indexes the normalized slices of every group in config order (``config_groups``,
    each normalized by ``group_slices``): a ``models`` list is one slice whose sources are the
    models in config order, then the base model if it was appended (which has no parameters).
    ``source_idx`` indexes that slice's sources.
    """

    def __init__(self, config: MergeConfiguration) -> None:
        self.config = config
        self._slices = _slice_places(config)

    def _places(self, slice_idx: int, source_idx: int | None) -> list[tuple[Mapping[str, Any] | None, tuple[Any, ...]]]:
        """(parameters, their config key path) in precedence order."""
        places = self._slices[slice_idx]
        out = []
        if source_idx is not None:
            if 0 <= source_idx < len(places.sources):
                out.append(places.sources[source_idx])
            # else: the appended base model, which has no parameters of its own
        return out + list(places.levels)

    def origin(self, name: str, slice_idx: int, source_idx: int | None, tensor_name: str, t: float) -> tuple[Any, ...]:
        """The config key path the value of ``name`` comes from (for error messages with a line)."""
        for params, where in self._places(slice_idx, source_idx):
            if _lookup(params, name, tensor_name, t) is not None:
                return (*where, name)
        return ("parameters", name)

    def global_value(self, name: str, slice_idx: int, out_tensor_name: str, t: float) -> Any:
        """A method-level parameter for an output tensor: slice, module, then top level; None if unset."""
        return self._first(self._places(slice_idx, None), name, out_tensor_name, t)

    def model_value(self, name: str, slice_idx: int, source_idx: int, in_tensor_name: str, t: float) -> Any:
        """A per-model parameter for one source's input tensor: source, slice, module, then top
        level; None if unset."""
        return self._first(self._places(slice_idx, source_idx), name, in_tensor_name, t)

    @staticmethod
    def _first(places: list[tuple[Mapping[str, Any] | None, tuple[Any, ...]]], name: str, tensor: str, t: float) -> Any:
        for params, _ in places:
            value = _lookup(params, name, tensor, t)
            if value is not None:
                return value
        return None


def group_slices(
    group: SliceGroup, base_model: ModelReference | None, num_layers: Callable[[ModelReference], int]
) -> list[OutputSliceDefinition]:
    """The group's output slices (no validation: ``num_layers`` is trusted); a ``models`` list
    becomes one slice covering ``[0, num_layers(model))`` of each model, in order, with the base
    model appended as an extra source without parameters when it is not among the models."""
    if group.slices is not None:
        return list(group.slices)
    models = group.models or ()
    sources = [
        InputSliceDefinition.model_construct(
            model=m.model, layer_range=(0, num_layers(m.model)), parameters=m.parameters
        )
        for m in models
    ]
    if base_model is not None and all(m.model != base_model for m in models):
        sources.append(
            InputSliceDefinition.model_construct(
                model=base_model, layer_range=(0, num_layers(base_model)), parameters=None
            )
        )
    return [
        OutputSliceDefinition.model_construct(sources=sources, base_model=None, residual_weight=None, parameters=None)
    ]


def normalize_to_slices(
    config: MergeConfiguration, num_layers: Callable[[ModelReference], int]
) -> list[OutputSliceDefinition]:
    """The output slices of a config of one layer stack (``group_slices`` of each group, in
    order): a ``models:`` config becomes one slice. A ``modules:`` config of several stacks is
    planned stack by stack (``config_modules.output_stacks``)."""
    return [sl for group in config_groups(config) for sl in group_slices(group, config.base_model, num_layers)]
