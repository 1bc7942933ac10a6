"""Which layer stack each group of a config merges: the modules of a ``modules:`` config.

mergekit merges a vision-language or encoder-decoder model module by module, each with its own
``slices`` or ``models`` and ``parameters``; its module names come from its architecture
definitions. mergekitty infers a model's layout from its tensor names instead
(``architecture/layout.py``): one main layer stack (the language model) and the other numbered
stacks (a vision tower...). A module name selects one stack of each model, tried in this order:

1. the stack's prefix itself (``model.vision_tower.vision_model.encoder.layers``), in either
   naming scheme of vision-language checkpoints;
2. a run of the prefix's dotted components (``vision_tower``, ``language_model``, ``encoder``);
3. mergekit's names: ``text_decoder`` (also ``default``, ``decoder``, ``text_model``) for the
   language model, ``vision_tower`` / ``vision_model`` / ``visual`` for the largest vision stack.

A single module on a model of one stack selects it whatever its name (mergekit's ``default``).
Each module's slices select layers of its own stack, numbered from 0 in the output. The tensors
outside the modules' stacks are planned as without modules: those before the layer stack with
the first slice of the language model's module, those after it with its last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .architecture.layout import ModelLayout, other_spellings
from .config import MergeConfiguration, OutputSliceDefinition
from .params import SliceGroup, config_groups, group_slices
from .refs import ModelReference

if TYPE_CHECKING:
    from .plan import InputModel

__all__ = ["LANGUAGE_MODULE_NAMES", "VISION_MODULE_NAMES", "StackSlices", "output_stacks", "stack_of_module"]

# mergekit's module names for the language model and the vision tower of its multi-module architectures
LANGUAGE_MODULE_NAMES = ("default", "text_decoder", "decoder", "text_model")
VISION_MODULE_NAMES = ("vision_tower", "vision_model", "visual")
_VISION_HINTS = ("vision", "visual", "image")


@dataclass(frozen=True)
class StackSlices:
    """The output slices of one layer stack, and where that stack is in each input."""

    group: SliceGroup  # the config's slices or models it comes from
    slices: tuple[OutputSliceDefinition, ...]  # normalized (``params.group_slices``)
    prefixes: tuple[str | None, ...]  # per input model: its prefix of this stack (None: it has none)
    main: bool  # the language model's stack, which the weights outside every stack follow


class AmbiguousModule(ValueError):
    """A module name that selects several stacks of one model."""


def _has_run(parts: Sequence[str], run: Sequence[str]) -> bool:
    return any(list(parts[i : i + len(run)]) == list(run) for i in range(len(parts) - len(run) + 1))


def _vision(prefix: str) -> bool:
    return any(h in prefix.lower() for h in _VISION_HINTS)


def _largest(prefixes: list[str], layout: ModelLayout) -> list[str]:
    """The stacks of ``prefixes`` with the most layers, then the most tensors."""

    def size(prefix: str) -> tuple[int, int]:
        return (layout.stacks[prefix], sum(len(t) for t in layout.stack_layers(prefix).values()))

    most = max((size(p) for p in prefixes), default=(0, 0))
    return [p for p in prefixes if size(p) == most]


def stack_of_module(name: str, layout: ModelLayout, single: bool = False) -> str | None:
    """The prefix of the layer stack of ``layout`` that module ``name`` selects (see the module
    docstring), None when none does; AmbiguousModule when several do. ``single``: the config has
    this module only."""
    stacks = layout.stacks
    if single and len(stacks) <= 1:
        return layout.prefix
    wanted = name.strip().rstrip(".")
    for prefix in stacks:
        if wanted == prefix or wanted in (s.rstrip(".") for s in other_spellings(prefix + ".")):
            return prefix
    found = [p for p in stacks if _has_run(p.split("."), wanted.split("."))]
    if not found and wanted in LANGUAGE_MODULE_NAMES:
        return layout.prefix or None
    if wanted in VISION_MODULE_NAMES:
        # the vision tower itself, not a numbered group inside it (a projector's layers)
        found = _largest([p for p in (found or stacks) if p != layout.prefix and _vision(p)], layout)
    if len(found) > 1:
        raise AmbiguousModule(", ".join(f"'{p}'" for p in found))
    return found[0] if found else None


def _available(layout: ModelLayout) -> str:
    """The module names a config can use for ``layout``'s stacks, for error messages."""
    out = []
    towers = _largest([p for p in layout.extra_stacks if _vision(p)], layout)
    for prefix, count in layout.stacks.items():
        if prefix == layout.prefix:
            out.append(f"'text_decoder' (the language model, '{prefix}', {count} layers)")
        elif towers == [prefix]:
            out.append(f"'{prefix}' or 'vision_tower' ({count} layers)")
        else:
            out.append(f"'{prefix}' ({count} layers)")
    return "; ".join(out) if out else "none (it has no numbered layers)"


def output_stacks(config: MergeConfiguration, models: Sequence[InputModel], donor: int) -> list[StackSlices]:
    """The config's groups (``params.config_groups``, in config order) with their normalized
    slices and their stack in each input model. A module that selects no stack of the donor (the
    model the output follows), two modules that select the same stack, a model read by a module
    but without its stack, and a multi-module config without the language model are ConfigErrors
    naming the module and its line."""
    groups = config_groups(config)
    index = {str(m.ref): i for i, m in enumerate(models)}
    single = len(groups) == 1
    out: list[StackSlices] = []
    owner: dict[str, str] = {}  # donor stack prefix -> module name
    for group in groups:
        if group.module is None:
            prefixes: tuple[str | None, ...] = tuple(m.layout.prefix for m in models)
        else:
            prefixes = _module_prefixes(config, group.module, models, donor, single)
            selected = prefixes[donor]
            assert selected is not None  # _module_prefixes raised otherwise
            if selected in owner:
                raise config.error(
                    f"modules '{owner[selected]}' and '{group.module}' both select the layer stack '{selected}'",
                    key=("modules", group.module),
                )
            owner[selected] = group.module
        main = prefixes[donor] == models[donor].layout.prefix

        def num_layers(
            ref: ModelReference, group: SliceGroup = group, prefixes: tuple[str | None, ...] = prefixes
        ) -> int:
            mi = index[str(ref)]
            return _stack_size(config, group, models[mi], prefixes[mi])

        slices = group_slices(group, config.base_model, num_layers)
        if group.slices is not None:
            for si, sl in enumerate(slices):
                for j, src in enumerate(sl.sources):
                    mi = index[str(src.model)]
                    if prefixes[mi] is None:
                        _stack_size(config, group, models[mi], None, (*group.source_key(si, j), "model"))
        out.append(StackSlices(group, tuple(slices), prefixes, main))
    if not any(s.main for s in out):
        donor_model = models[donor]
        raise config.error(
            f"no module selects the language model's layer stack '{donor_model.layout.prefix}' of "
            f"{donor_model.label}; add a module for it (mergekit's name: 'text_decoder')",
            key="modules",
        )
    return out


def _module_prefixes(
    config: MergeConfiguration, name: str, models: Sequence[InputModel], donor: int, single: bool
) -> tuple[str | None, ...]:
    """The stack module ``name`` selects in each model; a ConfigError when it selects none of the
    donor's, or several of one model's."""
    prefixes = []
    for m in models:
        try:
            prefixes.append(stack_of_module(name, m.layout, single))
        except AmbiguousModule as exc:
            raise config.error(
                f"module '{name}' matches several layer stacks of {m.label}: {exc}; name the stack by its prefix",
                key=("modules", name),
            ) from None
    if prefixes[donor] is None:
        raise config.error(
            f"module '{name}' matches no layer stack of {models[donor].label}; its modules: {_available(models[donor].layout)}",
            key=("modules", name),
        )
    return tuple(prefixes)


def _stack_size(
    config: MergeConfiguration, group: SliceGroup, model: InputModel, prefix: str | None, key: Any = None
) -> int:
    """The layer count of ``model``'s stack ``prefix``; a ConfigError when it has none."""
    count = model.layout.stack_size(prefix) if prefix is not None else None
    if count is None:
        raise config.error(
            f"{model.label} has no layer stack for module '{group.module}'; its modules: {_available(model.layout)}",
            key=key or ("modules", group.module),
        )
    return count
