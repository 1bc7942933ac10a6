"""Which layer stack and which weights each group of a config merges: the modules of a
``modules:`` config.

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

A name that selects no stack names a module without layers (mergekit's ``multi_modal_projector``,
T5's ``shared``): the weights outside every stack whose names hold it as a run of dotted parts
(``model.multi_modal_projector.``); its slices take ``layer_range: [0, 0]``.

A single module on a model of one stack selects it whatever its name (mergekit's ``default``).
Each module's slices select layers of its own stack, numbered from 0 in the output. Each module
also merges its own weights outside the layers (a tower's patch embeddings and final norm), with
its own sources and parameters: those under its root (``stack_roots``), the longest root taking a
weight. The weights under no module's root follow the language model's module, as without modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .architecture.layout import ModelLayout, is_embedding_name, other_spellings
from .config import MergeConfiguration, OutputSliceDefinition
from .params import SliceGroup, config_groups, group_slices
from .refs import ModelReference

if TYPE_CHECKING:
    from .plan import InputModel

__all__ = [
    "LANGUAGE_MODULE_NAMES",
    "VISION_MODULE_NAMES",
    "StackSlices",
    "layerless_root",
    "output_stacks",
    "stack_of_module",
    "stack_roots",
]

# mergekit's module names for the language model and the vision tower of its multi-module architectures
LANGUAGE_MODULE_NAMES = ("default", "text_decoder", "decoder", "text_model")
VISION_MODULE_NAMES = ("vision_tower", "vision_model", "visual")
_VISION_HINTS = ("vision", "visual", "image")


@dataclass(frozen=True)
class StackSlices:
    """The output slices of one module (a layer stack, or the weights of a module without
    layers), and where that module is in each input."""

    group: SliceGroup  # the config's slices or models it comes from
    slices: tuple[OutputSliceDefinition, ...]  # normalized (``params.group_slices``)
    prefixes: tuple[str | None, ...]  # per input model: its prefix of this stack (None: it has none)
    main: bool  # the language model's stack, which the weights under no module's root follow
    # per input model: the name prefix of the module's own weights outside its layers (None: none)
    roots: tuple[str | None, ...] = ()
    layerless: bool = False  # a module of weights only (a projector): no stack, slices of [0, 0]


class AmbiguousModule(ValueError):
    """A module name that selects several stacks of one model."""


def _has_run(parts: Sequence[str], run: Sequence[str]) -> bool:
    return any(list(parts[i : i + len(run)]) == list(run) for i in range(len(parts) - len(run) + 1))


def _vision(prefix: str) -> bool:
    return any(h in prefix.lower() for h in _VISION_HINTS)


def _size(prefix: str, layout: ModelLayout) -> tuple[int, int]:
    """A stack's layers, then its tensors: which of two stacks is the larger."""
    return (layout.stack_size(prefix) or 0, sum(len(t) for t in layout.stack_layers(prefix).values()))


def _largest(prefixes: list[str], layout: ModelLayout) -> list[str]:
    """The stacks of ``prefixes`` with the most layers, then the most tensors."""
    most = max((_size(p, layout) for p in prefixes), default=(0, 0))
    return [p for p in prefixes if _size(p, layout) == most]


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


def _loose(layout: ModelLayout) -> list[str]:
    """The tensors of ``layout`` in no numbered stack: the weights a module without layers can hold."""
    if not layout.stacks:
        return list(layout.pre)  # a model without layers: every tensor is a "pre" weight
    in_stack = re.compile("|".join(re.escape(p) + r"\.\d+\." for p in layout.stacks))
    return [n for n in (*layout.pre, *layout.post) if not in_stack.match(n)]


def layerless_root(name: str, layout: ModelLayout) -> str | None:
    """The name prefix (``model.multi_modal_projector.``) of the weights outside every layer stack
    of ``layout`` that module ``name`` names: a run of their dotted parts, short of the last (in
    either naming scheme of vision-language checkpoints); None when no weight has one;
    AmbiguousModule when the weights give several prefixes."""
    wanted = name.strip().rstrip(".")
    runs = [wanted.split("."), *(s.rstrip(".").split(".") for s in other_spellings(wanted + "."))]
    found: dict[str, None] = {}
    for tensor in _loose(layout):
        parts = tensor.split(".")
        for run in runs:
            at = next((i for i in range(len(parts) - len(run)) if parts[i : i + len(run)] == run), None)
            if at is not None:
                found[".".join(parts[: at + len(run)]) + "."] = None
                break
    if len(found) > 1:
        raise AmbiguousModule(", ".join(f"'{p}'" for p in found))
    return next(iter(found), None)


def stack_roots(prefixes: Mapping[int, str], main: int | None, layout: ModelLayout) -> dict[int, str]:
    """The root of each selected stack of one model (``prefixes``: module index -> stack prefix in
    ``layout``): the name prefix its module's own weights outside the layers are under. It is the
    fewest leading dotted parts of the stack's parent that hold no rival stack: the main stack's
    rivals are the other stacks, another stack's the main one and those at least as large as it,
    so a tower's root (``visual.``) may hold a smaller module's stack, whose root is then longer
    (``visual.merger.``). When every part holds a rival: the main stack's whole parent, another
    stack's own prefix (it has no weights of its own to tell apart)."""
    out = {}
    for k, prefix in prefixes.items():
        rivals = [
            p
            for j, p in prefixes.items()
            if j != k and (k == main or j == main or _size(p, layout) >= _size(prefix, layout))
        ]
        parent = prefix.split(".")[:-1]
        roots = (".".join(parent[:n]) + "." for n in range(1, len(parent) + 1))
        root = next((r for r in roots if not any((p + ".").startswith(r) for p in rivals)), None)
        if root is None:
            root = (".".join(parent) + "." if parent else "") if k == main else prefix + "."
        out[k] = root
    return out


def _layerless_names(layout: ModelLayout) -> list[str]:
    """Names of modules without layers that ``layout`` has, for error messages: the first part
    (after a leading ``model``) of the weights under no stack's root, heads and embeddings aside."""
    stacks = list(layout.stacks)
    main = stacks.index(layout.prefix) if layout.prefix in stacks else None
    roots = stack_roots(dict(enumerate(stacks)), main, layout).values()
    out: dict[str, None] = {}
    for name in _loose(layout):
        parts = name.split(".")
        parts = parts[1:] if parts[0] == "model" else parts
        if len(parts) > 1 and not is_embedding_name(name) and not any(r and name.startswith(r) for r in roots):
            out[parts[0]] = None
    return list(out)


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
    out += [f"'{name}' (no layers)" for name in _layerless_names(layout)]
    return "; ".join(out) if out else "none (it has no numbered layers)"


@dataclass(frozen=True)
class _Selected:
    """What one module selects in each model: a stack prefix, or (``layerless``) a weights root."""

    group: SliceGroup
    found: tuple[str | None, ...]
    layerless: bool


def output_stacks(config: MergeConfiguration, models: Sequence[InputModel], donor: int) -> list[StackSlices]:
    """The config's groups (``params.config_groups``, in config order) with their normalized
    slices, their stack (or weights, for a module without layers) in each input model and the
    root of each module's own weights. A module that selects nothing of the donor (the model the
    output follows), two modules that select the same stack or weights, a model read by a module
    but without its stack or weights, and a multi-module config without the language model are
    ConfigErrors naming the module and its line."""
    groups = config_groups(config)
    index = {str(m.ref): i for i, m in enumerate(models)}
    single = len(groups) == 1
    selected: list[_Selected] = []
    owner: dict[str, str] = {}  # the donor's stack prefix or weights root -> module name
    for group in groups:
        if group.module is None:
            selected.append(_Selected(group, tuple(m.layout.prefix for m in models), False))
            continue
        sel = _module_selection(config, group, models, donor, single)
        chosen = sel.found[donor]
        assert chosen is not None  # _module_selection raised otherwise
        if chosen in owner:
            what = f"the weights under '{chosen}'" if sel.layerless else f"the layer stack '{chosen}'"
            raise config.error(
                f"modules '{owner[chosen]}' and '{group.module}' both select {what}", key=("modules", group.module)
            )
        owner[chosen] = group.module
        selected.append(sel)
    mains = [not s.layerless and s.found[donor] == models[donor].layout.prefix for s in selected]
    if not any(mains):
        donor_model = models[donor]
        raise config.error(
            f"no module selects the language model's layer stack '{donor_model.layout.prefix}' of "
            f"{donor_model.label}; add a module for it (mergekit's name: 'text_decoder')",
            key="modules",
        )
    roots = _roots(selected, mains, models)
    out = []
    for k, (sel, main) in enumerate(zip(selected, mains)):
        group = sel.group

        def num_layers(ref: ModelReference, sel: _Selected = sel) -> int:
            mi = index[str(ref)]  # a listed model (checked above) or the base model
            return _stack_size(config, sel, models[mi], mi, ("base_model",))

        for j, listed in enumerate(group.models or ()):  # each listed model, before group_slices asks
            mi = index[str(listed.model)]
            _stack_size(config, sel, models[mi], mi, (*group.source_key(0, j), "model"))
        slices = group_slices(group, config.base_model, num_layers)
        if group.slices is not None:
            for si, sl in enumerate(slices):
                for j, src in enumerate(sl.sources):
                    mi = index[str(src.model)]
                    _stack_size(config, sel, models[mi], mi, (*group.source_key(si, j), "model"))
        prefixes = tuple(None for _ in models) if sel.layerless else sel.found
        out.append(StackSlices(group, tuple(slices), prefixes, main, tuple(r[k] for r in roots), sel.layerless))
    return out


def _roots(selected: list[_Selected], mains: list[bool], models: Sequence[InputModel]) -> list[list[str | None]]:
    """Per model, per module: the root of the module's own weights (``stack_roots`` for the
    stacks, the found prefix for a module without layers), None where the model has none."""
    out = []
    for mi, m in enumerate(models):
        stacks = {k: p for k, s in enumerate(selected) if not s.layerless and (p := s.found[mi]) is not None}
        main = next((k for k in stacks if mains[k]), None)
        of_stacks = stack_roots(stacks, main, m.layout)
        out.append([s.found[mi] if s.layerless else of_stacks.get(k) for k, s in enumerate(selected)])
    return out


def _module_selection(
    config: MergeConfiguration, group: SliceGroup, models: Sequence[InputModel], donor: int, single: bool
) -> _Selected:
    """The stack module ``group.module`` selects in each model, else (when it selects no stack of
    the donor) the weights of a module without layers; a ConfigError when it selects neither in
    the donor, or several stacks or weight roots of one model."""
    name = group.module
    assert name is not None

    def each(find: Any, what: str) -> tuple[str | None, ...]:
        found = []
        for m in models:
            try:
                found.append(find(m))
            except AmbiguousModule as exc:
                raise config.error(
                    f"module '{name}' matches several {what} of {m.label}: {exc}; name it by its prefix",
                    key=("modules", name),
                ) from None
        return tuple(found)

    prefixes = each(lambda m: stack_of_module(name, m.layout, single), "layer stacks")
    if prefixes[donor] is not None:
        return _Selected(group, prefixes, False)
    roots = each(lambda m: layerless_root(name, m.layout), "weight prefixes")
    if roots[donor] is not None:
        return _Selected(group, roots, True)
    raise config.error(
        f"module '{name}' matches no layer stack of {models[donor].label} and no weights outside them; "
        f"its modules: {_available(models[donor].layout)}",
        key=("modules", name),
    )


def _stack_size(config: MergeConfiguration, sel: _Selected, model: InputModel, mi: int, key: Any = None) -> int:
    """The layer count of ``model``'s stack of module ``sel`` (0 for a module without layers);
    a ConfigError when the model has neither the stack nor the module's weights."""
    found = sel.found[mi]
    count = None if found is None else 0 if sel.layerless else model.layout.stack_size(found)
    if count is None:
        what = "weights" if sel.layerless else "layer stack"
        raise config.error(
            f"{model.label} has no {what} for module '{sel.group.module}'; its modules: {_available(model.layout)}",
            key=key or ("modules", sel.group.module),
        )
    return count
