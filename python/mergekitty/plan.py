"""Turn a config and the input headers into a frozen list of tensor jobs. No tensor is read here.

Every user mistake that can be found without reading weights (a missing tensor,
a shape mismatch, a bad parameter value, an output directory that is an input)
surfaces here, before the merge starts.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architecture.layout import (
    ModelLayout,
    before_stack,
    is_embedding_name,
    is_head_name,
    is_recomputed_buffer,
    other_spellings,
    set_untied,
    set_vocab_size,
    spelled_like,
    stack_count_key,
    ties_embeddings,
)
from .errors import ArchitectureError, ConfigError, PlanError
from .io.dtypes import nbytes
from .kernels import JobInput, Kernel, Torch, choose
from .text import listing, shape_text

if TYPE_CHECKING:
    from .config_modules import StackSlices
    from .memory import MemoryEstimate
    from .tokenizer.build import VocabPlan
from .methods.base import MergeMethod, ParamSpec

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE_BYTES = 5 * 10**9


@dataclass(frozen=True)
class Source:
    """One input tensor: which model (index into ``MergePlan.models``) and its name there."""

    model: int
    tensor: str


@dataclass(frozen=True)
class TensorJob:
    out_name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code of the written tensor
    sources: tuple[Source, ...]  # non-base inputs, config order
    model_params: tuple[dict[str, Any], ...]
    base: Source | None
    params: dict[str, Any]
    input_bytes: int
    output_bytes: int
    # vocabulary-sized tensors whose rows are re-laid out to the output vocabulary (tokenizer.build)
    aligned: bool = False
    row_sources: tuple[Source, ...] = ()  # further models' tensors the default rows are taken from
    kernel: Kernel = Torch("unplanned")  # how the executor computes it (kernels.choose)
    shard: str = ""  # the output file it is written to (native.plan_layout, as the ShardWriter places it)
    offset: int = 0  # its absolute byte offset in that file

    @property
    def layout_entry(self) -> tuple[str, str, list[int]]:
        """(name, dtype code, shape): how the shard layout and the ShardWriter see this tensor."""
        return (self.out_name, self.out_dtype, list(self.shape))

    @property
    def inputs(self) -> tuple[Source, ...]:
        """The base (when the method uses one) followed by the sources: what kernels index."""
        return (self.base, *self.sources) if self.base is not None else self.sources


@dataclass(frozen=True)
class Excluded:
    """Tensors of one input that no output tensor reads, and why. Every other input tensor is
    read by some job: the planner checks it, so that no tensor is ever left out unsaid."""

    model: int  # index into MergePlan.models
    reason: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class PlannedModel:
    """An input as the plan records it: enough to open it again, in this process or another."""

    label: str  # the model reference as the config wrote it
    path: Path  # the resolved local directory
    num_layers: int
    tokenizer_dir: Path  # where its tokenizer files are (a model+lora input's adapter when it ships one)
    adapter: Path | None = None  # model+lora: the resolved adapter directory
    lora_merge_dtype: str | None = None  # model+lora: dtype the adapted tensors are rounded to
    files: tuple[str, ...] | None = None  # the weight files of ``path`` it is (a state-dict file); None: found there
    # a recipe stage read without being written: its plan, whose jobs compute its tensors on demand
    # (``path`` then holds only its side files: config.json, tokenizer, layout)
    stage: MergePlan | None = None

    @property
    def ref(self) -> str:
        return self.label

    def open(self, device: str = "cpu", threads: int = 0, allow_nonfinite: bool = False) -> Any:
        """The checkpoint (io.checkpoint.Checkpoint, a recipe stage's recipe.stage.StageCheckpoint,
        or lora.apply's adapted view of either). ``threads`` and ``allow_nonfinite``: how a
        stage's jobs compute (as its own merge would, with the options of this one)."""
        from .io.checkpoint import Checkpoint

        checkpoint: Any
        if self.stage is not None:
            from .recipe.stage import StageCheckpoint

            checkpoint = StageCheckpoint(self.stage, self.path, self.label, threads, allow_nonfinite)
        else:
            files = list(self.files) if self.files is not None else None
            checkpoint = Checkpoint(self.path, label=self.label, files=files)
        if self.adapter is None:
            return checkpoint
        # model+lora: the adapter is applied tensor by tensor as the executor loads them
        from .lora.apply import open_lora_checkpoint

        return open_lora_checkpoint(
            checkpoint, self.adapter, label=self.label, device=device, merge_dtype=self.lora_merge_dtype
        )


@dataclass(frozen=True)
class InputModel:
    """An input while planning: its open checkpoint, config.json and inferred layout."""

    ref: Any  # ModelReference
    planned: PlannedModel
    checkpoint: Any  # io.checkpoint.Checkpoint
    config: dict[str, Any]
    layout: ModelLayout

    @property
    def label(self) -> str:
        return self.planned.label

    @property
    def path(self) -> Path:
        return self.planned.path


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided before any weight is read: frozen, holding no open
    file, and written to and read from JSON (``to_json``/``from_json``) so that another
    process can execute it (``execute.execute`` opens the inputs itself)."""

    method: MergeMethod
    models: tuple[PlannedModel, ...]
    donor: int  # the model whose config.json, tokenizer and tensor names the output follows
    base: int | None
    jobs: tuple[TensorJob, ...]  # in execution order (sequential reads)
    output_order: tuple[str, ...]  # tensor names in the order they are laid out in the output
    out_config: dict[str, Any]
    layer_map: tuple[tuple[int, tuple[tuple[str, int], ...]], ...] = ()  # out layer -> ((model label, in layer), ...)
    random_seed: int = 0  # used by random methods; recorded in the model card
    vocab: Any = None  # tokenizer.build.VocabPlan, None when no input has tokenizer files
    device: str = "cpu"  # where the jobs run; the kernels were chosen for it
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES  # the output's shard budget (<= 0: one file)
    excluded: tuple[Excluded, ...] = ()  # the input tensors no job reads, with the reason

    def __repr__(self) -> str:
        # the dataclass repr would print every job: one line that says what the plan does instead
        from .sizes import format_size

        return (
            f"<MergePlan {self.method.name}: {len(self.models)} models, {len(self.jobs)} tensors, "
            f"reads {format_size(self.input_bytes)}, writes {format_size(self.output_bytes)}, on {self.device}>"
        )

    def summary(self) -> str:
        """What the merge will do, in a few lines of plain text: the method, each model and its
        role, the layer count, tensors written and left out, sizes and the memory estimate."""
        from .sizes import format_size

        lines = [f"method: {self.method.name}"]
        for i, m in enumerate(self.models):
            roles = [r for r, on in (("donor", i == self.donor), ("base", i == self.base)) if on]
            lines.append(f"model {i}: {m.label}, {m.num_layers} layers" + (f" ({', '.join(roles)})" if roles else ""))
        if self.layer_map:
            lines.append(f"output layers: {len(self.layer_map)}")
        lines.append(f"tensors: {len(self.jobs)} written, {sum(len(e.tensors) for e in self.excluded)} left out")
        lines.append(f"reads {format_size(self.input_bytes)}, writes {format_size(self.output_bytes)}")
        memory = self.memory_estimate()
        lines.append(f"peak memory estimate: {format_size(memory.anonymous_bytes)} allocated")
        if self.method.random:
            lines.append(f"random seed: {self.random_seed}")
        return "\n".join(lines)

    def output_layout(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype code, shape) of every output tensor in output order: what the ShardWriter
        is created with (with ``shard_size_bytes``) to place each job at its planned offset."""
        by_name = {j.out_name: j for j in self.jobs}
        return [by_name[name].layout_entry for name in self.output_order]

    def to_json(self) -> str:
        from .plan_json import dumps

        return dumps(self)

    @staticmethod
    def from_json(text: str) -> MergePlan:
        from .plan_json import loads

        plan = loads(text)
        if not isinstance(plan, MergePlan):
            raise PlanError("the JSON text is not a merge plan")
        return plan

    @property
    def input_bytes(self) -> int:
        return sum(j.input_bytes for j in self.jobs)

    @property
    def output_bytes(self) -> int:
        return sum(j.output_bytes for j in self.jobs)

    def memory_estimate(self) -> MemoryEstimate:
        """Peak anonymous memory and resident input pages of executing this plan (memory.py)."""
        from .memory import estimate

        return estimate(self)


def _set_nested(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


def _get_parent(cfg: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = cfg
    for p in dotted.split(".")[:-1]:
        node = node[p]
    return node


def layer_range_text(start: int, stop: int) -> str:
    """``layer_range [0, 9] (layers 0-8)``: the range as written, and the layers it selects (the
    stop is excluded, which a reader of ``[0, 9]`` may not expect)."""
    layers = f"layer {start}" if stop - start == 1 else f"layers {start}-{stop - 1}"
    return f"layer_range [{start}, {stop}] ({layers})"


def _placed(jobs: list[TensorJob], shard_size_bytes: int) -> list[TensorJob]:
    """``jobs`` (in output order) with the shard and offset the ShardWriter will give each."""
    from . import _native

    places = _native.plan_layout([j.layout_entry for j in jobs], shard_size_bytes)
    return [replace(j, shard=shard, offset=offset) for j, (_, shard, offset, _) in zip(jobs, places)]


@dataclass(frozen=True)
class SlicePicks:
    """One slice's reads: (model, first layer, source index) per non-base input, the base's
    (model, first layer) or None, and the number of layers."""

    entries: list[tuple[int, int, int]]
    base: tuple[int, int] | None
    length: int


def _readers(sp: SlicePicks) -> list[tuple[int, int]]:
    """(model, first layer) of every model a slice reads: its base (when the method uses it) and
    its other sources."""
    return ([sp.base] if sp.base else []) + [(mi, start) for mi, start, _ in sp.entries]


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor before its job is built: (model, input name, source index) per
    non-base input, the base's (model, input name), its slice and layer position ``t``."""

    out_name: str
    slice: int
    t: float
    picks: list[tuple[int, str, int]]
    base: tuple[int, str] | None


# What a raw merge (raw_merge.py) does with a tensor that some of its models lack: stop with an
# error naming it (the default), leave it out (--tensor-intersection), or merge it from the models
# that have it (--tensor-union).
MISSING_TENSOR_POLICIES = ("error", "intersection", "union")


class Planner:
    """Builds a MergePlan. ``open_model(ref) -> (path, Checkpoint, config dict)`` does the I/O of headers.

    ``raw`` plans a merge of plain state dicts (raw_merge.py): tensors are matched by their name
    alone (no tied heads, no second naming scheme, no rebuilt buffers), and a tensor some models
    lack is handled by that policy (one of MISSING_TENSOR_POLICIES). None: Hugging Face models."""

    def __init__(
        self, config: Any, method: MergeMethod, models: list[InputModel], options: Any, raw: str | None = None
    ) -> None:
        from .params import ParameterResolver

        if raw is not None and raw not in MISSING_TENSOR_POLICIES:
            raise PlanError(
                f"unknown policy for missing tensors {raw!r} (expected {', '.join(MISSING_TENSOR_POLICIES)})"
            )
        self.raw = raw
        self.config = config
        self.method = method
        self.models = models
        self.options = options
        self.index_of = {str(m.ref): i for i, m in enumerate(models)}
        self.resolver = ParameterResolver(config)
        self.used_param_names: set[str] = set()
        self.vocab: VocabPlan | None = None  # the output vocabulary, given to plan()
        # head name -> models without it whose input embedding is read as their head (tied embeddings)
        self.tied_heads: dict[str, set[int]] = defaultdict(set)
        # the layer stacks planned (one, or one per module of a ``modules:`` config), given to plan()
        self.stacks: list[StackSlices] = []
        self._ranges: list[tuple[int, int]] = []  # per stack: its slices' [start, stop) in the flat slice list
        self._slice_stack: list[tuple[int, int]] = []  # per flat slice: (its stack, its index there)
        self._main = 0  # the stack of the language model
        self._layer_cache: dict[tuple[int, str], dict[int, tuple[str, ...]]] = {}
        self._other_stack_names: dict[int, set[str]] = {}
        self._roots: dict[int, list[tuple[str, int]]] = {}  # per model: (module root, its stack), longest first
        # (model, tensor) -> why the output leaves it out, for tensors the enumeration skips on purpose
        self.skipped: dict[tuple[int, str], str] = {}

    # ---------------------------------------------------------------- helpers
    def _model(self, ref: Any) -> int:
        return self.index_of[str(ref)]

    def _stored(self, model: int, name: str) -> str | None:
        """The name under which ``model`` stores ``name`` (itself, or its spelling under the other
        vision-language naming scheme); None when it does not."""
        checkpoint = self.models[model].checkpoint
        if self.raw is not None:
            return name if name in checkpoint else None
        return next((n for n in (name, *other_spellings(name)) if n in checkpoint), None)

    def _tied_head(self, model: int, name: str) -> str | None:
        """For a head (lm_head, embed_out...) that ``model`` does not store: its input embedding,
        when the model ties them (its config.json does not say ``tie_word_embeddings: false``)."""
        m = self.models[model]
        if (
            self.raw is None
            and is_head_name(name)
            and m.layout.input_embedding
            and ties_embeddings(m.config) is not False
        ):
            return m.layout.input_embedding
        return None

    def _find_all(self, out_name: str, wanted: Iterable[tuple[int, str]]) -> list[str]:
        """The stored name of each (model, name) of one output tensor, a missing head read from a
        tied model's embedding; one PlanError naming the tensor and every model that lacks it."""
        wanted = list(wanted)
        found: list[str | None] = []
        for mi, name in wanted:
            stored = self._stored(mi, name)
            if stored is None and (stored := self._tied_head(mi, name)) is not None:
                self.tied_heads[out_name].add(mi)
            found.append(stored)
        if all(f is not None for f in found):
            return [f for f in found if f is not None]
        having = [mi for mi, f in zip((mi for mi, _ in wanted), found) if f is not None]
        lacking = []
        for (mi, name), f in zip(wanted, found):
            if f is None:
                lacking.append(self.models[mi].label + self._missing_note(mi, name, out_name, having))
        present = f" but present in {self._labels(set(having))}" if having else ""
        if not having:  # a tensor of the donor, which is not read here
            present = f" (the output follows {self.models[self.donor].label}, which has it)"
        hint = ""
        if self.raw is not None:
            hint = " (--tensor-intersection leaves such tensors out, --tensor-union merges them from the models that have them)"
        raise PlanError(
            f"tensor '{out_name}' is missing from {', '.join(lacking)}{present}: every model a tensor is "
            f"merged from must have it{hint}"
        )

    def _missing_note(self, mi: int, name: str, out_name: str, having: list[int]) -> str:
        """What helps to see why ``mi`` lacks ``name``: the name it was read under, an untied
        config, or the closest name that only this model has (a tensor under another name)."""
        m = self.models[mi]
        notes = [f"as '{name}'"] if name != out_name else []
        if is_head_name(name) and ties_embeddings(m.config) is False:
            notes.append("its config.json says tie_word_embeddings: false")
        else:
            own = [n for n in m.checkpoint.names() if not any(n in self.models[h].checkpoint for h in having)]
            close = difflib.get_close_matches(name, own, n=1)
            if close:
                notes.append(f"closest: '{close[0]}'")
        return f" ({'; '.join(notes)})" if notes else ""

    def _global_params(self, slice_idx: int, out_name: str, t: float) -> dict[str, Any]:
        out = {}
        for spec in self.method.global_params:
            value = self.resolver.global_value(spec.name, slice_idx, out_name, t)
            out[spec.name] = self._checked(
                spec, value, out_name, None, lambda: self.resolver.origin(spec.name, slice_idx, None, out_name, t)
            )
        return out

    def _model_params(self, slice_idx: int, source_idx: int, in_name: str, t: float, label: str) -> dict[str, Any]:
        out = {}
        for spec in self.method.model_params:
            value = self.resolver.model_value(spec.name, slice_idx, source_idx, in_name, t)
            out[spec.name] = self._checked(
                spec, value, in_name, label, lambda: self.resolver.origin(spec.name, slice_idx, source_idx, in_name, t)
            )
        return out

    def _checked(
        self,
        spec: ParamSpec,
        value: Any,
        tensor: str,
        label: str | None,
        origin: Callable[[], tuple[Any, ...]] | None = None,
    ) -> Any:
        where = f"for model {label}, tensor '{tensor}'" if label else f"for tensor '{tensor}'"
        if value is None:
            if spec.required:
                raise self._config_error(
                    f"merge method '{self.method.name}' needs parameter '{spec.name}' {where}", ("parameters",)
                )
            return spec.default
        try:
            return spec.check(value)
        except ValueError as exc:
            if origin is not None and hasattr(self.config, "error"):
                raise self.config.error(f"{exc} {where}", key=origin()) from None
            raise self._config_error(f"{exc} {where}", ("parameters", spec.name)) from None

    # ---------------------------------------------------------------- planning
    def plan(
        self,
        stacks: Sequence[StackSlices],
        vocab: VocabPlan | None = None,
        random_seed: int = 0,
        device: str = "cpu",
        shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    ) -> MergePlan:
        """The plan of the slices of ``stacks`` (``config_modules.output_stacks``) for the output
        vocabulary ``vocab`` (tokenizer.build.VocabPlan or None), with kernels chosen for
        ``device`` and the output laid out in shards of ``shard_size_bytes``."""
        self.vocab = vocab
        self._set_stacks(stacks)
        method = self.method
        donor = self.donor
        base_ref = self.config.base_model
        if method.base == "required" and base_ref is None:
            raise self._config_error(f"merge method '{method.name}' needs a base_model", ("base_model",))
        slices = [sl for st in self.stacks for sl in st.slices]
        picks = [self._slice_picks(si, sl, base_ref) for si, sl in enumerate(slices)]
        layer_map: list[tuple[int, tuple[tuple[str, int], ...]]] = []
        tensors = [k for t in self._output_tensors(picks, layer_map) if (k := self._kept(t)) is not None]
        jobs = _placed([self._job(tensor, device) for tensor in tensors], shard_size_bytes)
        excluded = self._accounted(picks, jobs)
        out_layers = [sum(sp.length for sp in picks[lo:hi]) for lo, hi in self._ranges]
        out_config = self._out_config(donor, out_layers)
        if self.raw is None:
            self._untie_for_heads(out_config, jobs)
        if self.vocab is not None and any(j.aligned for j in jobs):
            set_vocab_size(out_config, self.vocab.rows)
        return MergePlan(
            method,
            tuple(m.planned for m in self.models),
            donor,
            self._model(base_ref) if base_ref is not None else None,
            tuple(sorted(jobs, key=self._read_position)),
            tuple(j.out_name for j in jobs),
            out_config,
            tuple(layer_map),
            random_seed,
            vocab,
            device,
            shard_size_bytes,
            excluded,
        )

    def _set_stacks(self, stacks: Sequence[StackSlices]) -> None:
        self.stacks = list(stacks)
        self._ranges, self._slice_stack = [], []
        for k, st in enumerate(self.stacks):
            self._ranges.append((len(self._slice_stack), len(self._slice_stack) + len(st.slices)))
            self._slice_stack += [(k, i) for i in range(len(st.slices))]
        self._main = next(k for k, st in enumerate(self.stacks) if st.main)
        self._other_stack_names = {}
        self._roots = {}

    def _prefix(self, stack: int, model: int) -> str:
        """``model``'s prefix of layer stack ``stack`` (a model a slice reads has it: _slice_picks)."""
        prefix = self.stacks[stack].prefixes[model]
        assert prefix is not None
        return prefix

    def _layers(self, model: int, prefix: str) -> dict[int, tuple[str, ...]]:
        """Layer index -> tensor suffixes of ``model``'s stack ``prefix``."""
        key = (model, prefix)
        if key not in self._layer_cache:
            self._layer_cache[key] = self.models[model].layout.stack_layers(prefix)
        return self._layer_cache[key]

    def _in_other_stacks(self, model: int) -> set[str]:
        """``model``'s tensors in the layer stacks that modules select besides its main one: they
        are planned layer by layer, not with the weights before or after the main stack."""
        if model not in self._other_stack_names:
            layout = self.models[model].layout
            names = set()
            for st in self.stacks:
                prefix = st.prefixes[model]
                if prefix is not None and prefix != layout.prefix:
                    names |= {
                        f"{prefix}.{i}.{rest}" for i, rests in self._layers(model, prefix).items() for rest in rests
                    }
            self._other_stack_names[model] = names
        return self._other_stack_names[model]

    def _owner(self, model: int, name: str) -> int:
        """The stack (module) whose own weights ``name`` of ``model`` is, outside the layers: the
        module whose root is the longest prefix of the name; the main stack's when none is."""
        if len(self.stacks) == 1:
            return self._main
        if model not in self._roots:
            roots = [(r, k) for k, st in enumerate(self.stacks) for r in st.roots[model : model + 1] if r is not None]
            self._roots[model] = sorted(roots, key=lambda rk: -len(rk[0]))
        return next((k for root, k in self._roots[model] if name.startswith(root)), self._main)

    def _before(self, stack: int, model: int, name: str) -> bool:
        """Whether module ``stack``'s own weight ``name`` of ``model`` (outside the layers) comes
        before its layer stack (t=0, its first slice) rather than after it (t=1, its last). The main
        module's follow the layout's pre and post weights; another module's are told apart by their
        name under its root (``layout.before_stack``); a module without layers has all of them
        before, as mergekit's inferred modules."""
        st = self.stacks[stack]
        if stack == self._main:
            return name in self.models[model].layout.pre
        return st.layerless or before_stack(name[len(st.roots[model] or "") :])

    def _own_weights(self, stack: int, model: int, before: bool) -> list[str]:
        """``model``'s weights outside the layers of the modules' stacks that belong to module
        ``stack`` (``_owner``) and come before its layer stack (``before``) or after it."""
        layout = self.models[model].layout
        other = self._in_other_stacks(model)
        main = stack == self._main
        names = (layout.pre if before else layout.post) if main else (*layout.pre, *layout.post)
        return [
            n
            for n in names
            if n not in other and self._owner(model, n) == stack and (main or self._before(stack, model, n) == before)
        ]

    def _config_error(self, message: str, key: tuple[Any, ...]) -> ConfigError:
        """A ConfigError at config key ``key``, with its line when the config knows it."""
        if hasattr(self.config, "error"):
            error: ConfigError = self.config.error(message, key=key)
            return error
        from .yaml_lines import format_path

        return ConfigError(message, key=format_path(key))

    def _slice_picks(self, si: int, sl: Any, base_ref: Any) -> SlicePicks:
        """Which models a slice reads, from which layer, and which is its base; checks the ranges."""
        method = self.method
        k, local = self._slice_stack[si]
        group = self.stacks[k].group
        uses_base = method.base != "ignored"
        slice_base = getattr(sl, "base_model", None) or base_ref
        entries, base_entry = [], None
        lengths = set()
        for j, src in enumerate(sl.sources):
            start, stop = src.layer_range
            mi = self._model(src.model)
            count = self._stack_count(k, mi, (*group.source_key(local, j), "model"))
            self._check_range(k, mi, start, stop, count, (*group.source_key(local, j), "layer_range"))
            lengths.add(stop - start)
            is_base = slice_base is not None and str(src.model) == str(slice_base)
            if uses_base and is_base:
                base_entry = (mi, start)
            elif is_base and not self._listed(group, src.model):
                continue  # a base the method does not use, added only to carry the config
            else:
                entries.append((mi, start, j))
        if len(lengths) > 1 and group.slices is None:
            self._different_layer_counts(k, group, sl)
        if len(lengths) > 1:
            raise self._config_error(
                f"all sources of a slice must cover the same number of layers (got {listing(sorted(lengths))})",
                (*group.slice_key(local), "sources"),
            )
        if uses_base and base_entry is None and slice_base is not None:
            base_model = self._model(slice_base)
            base_key = (*group.slice_key(local), "base_model") if getattr(sl, "base_model", None) else ("base_model",)
            count = self._stack_count(k, base_model, base_key)
            start = sl.sources[0].layer_range[0]
            self._check_base_range(k, base_model, start, start + max(lengths, default=0), count, group, local, base_key)
            base_entry = (base_model, start)
        if not entries and not (uses_base and base_entry):
            raise self._config_error("a slice needs at least one source model", (*group.slice_key(local), "sources"))
        if method.max_models is not None and len(entries) > method.max_models:
            raise self._config_error(
                f"merge method '{method.name}' takes at most {method.max_models} model(s) per tensor, got {len(entries)}",
                (*group.slice_key(local), "sources") if group.slices is not None else group.key,
            )
        return SlicePicks(entries, base_entry, lengths.pop() if lengths else 0)

    def _check_range(self, stack: int, model: int, start: int, stop: int, count: int, key: tuple[Any, ...]) -> None:
        """A ConfigError at ``key`` for a layer range beyond the ``count`` layers of ``model``'s
        stack, and for an empty one but in a module without layers, which only takes [0, 0]."""
        st = self.stacks[stack]
        if st.layerless and (start, stop) != (0, 0):
            raise self._config_error(
                f"layer_range [{start}, {stop}] of module '{st.group.module}': the module has no layers (its "
                f"weights are under '{st.roots[model]}' in {self.models[model].label}); give layer_range [0, 0]",
                key,
            )
        # a models list takes every layer of each model, none of a model without a layer stack
        whole = st.group.slices is None and count == 0
        if not st.layerless and start == stop and not whole:
            raise self._config_error(
                f"layer_range [{start}, {stop}] selects no layers of {self._stack_label(stack, model)}; "
                "only a module without layers (a projector) takes [0, 0]",
                key,
            )
        if stop > count:
            raise self._config_error(
                f"{layer_range_text(start, stop)} is beyond the {count} layers of {self._stack_label(stack, model)}",
                key,
            )

    def _different_layer_counts(self, stack: int, group: Any, sl: Any) -> None:
        """A ``models`` list merges every layer of each model: a ConfigError at the first model (or
        the base model) whose layer count differs from the first model's."""
        first = sl.sources[0]
        want = first.layer_range[1] - first.layer_range[0]
        listed = len(group.models or ())
        for j, src in enumerate(sl.sources):
            count = src.layer_range[1] - src.layer_range[0]
            if count == want:
                continue
            # the base model, appended when it is not listed, is named by the base_model key
            key = (*group.key, j, "model") if j < listed else ("base_model",)
            raise self._config_error(
                f"{self._stack_label(stack, self._model(src.model))} has {count} layers but "
                f"{self._stack_label(stack, self._model(first.model))} has {want}: a models list merges every "
                "layer of each model (slices with layer_range can pick layers)",
                key,
            )

    def _check_base_range(
        self,
        stack: int,
        model: int,
        start: int,
        stop: int,
        count: int,
        group: Any,
        local: int,
        base_key: tuple[Any, ...],
    ) -> None:
        """The base model of a slice that does not list it supplies the sources' layers
        ``[start, stop)``: a ConfigError when it has fewer, at the range of a slice (where the
        range was written) or at ``base_key`` (a ``models`` list, whose range is every layer)."""
        if self.stacks[stack].layerless or stop <= count:
            return
        label = self._stack_label(stack, model)
        if group.slices is not None:
            raise self._config_error(
                f"{layer_range_text(start, stop)} is beyond the {count} layers of the base model {label}, "
                "which supplies these layers to the slice",
                (*group.source_key(local, 0), "layer_range"),
            )
        raise self._config_error(
            f"the base model {label} has {count} layers but the models merged onto it have {stop}", base_key
        )

    def _stack_count(self, stack: int, model: int, key: tuple[Any, ...]) -> int:
        """The layer count of ``model``'s layer stack ``stack`` (0 for a module without layers); a
        ConfigError at ``key`` when it has neither the stack nor the module's weights."""
        st = self.stacks[stack]
        if st.layerless:
            count = 0 if st.roots[model] is not None else None
        else:
            prefix = st.prefixes[model]
            count = self.models[model].layout.stack_size(prefix) if prefix is not None else None
        if count is None:
            what = "weights" if st.layerless else "layer stack"
            raise self._config_error(f"{self.models[model].label} has no {what} for module '{st.group.module}'", key)
        return count

    def _stack_label(self, stack: int, model: int) -> str:
        """``model``'s label, and the stack's prefix when it is not the model's main stack."""
        prefix, m = self.stacks[stack].prefixes[model], self.models[model]
        return m.label if prefix == m.layout.prefix else f"{m.label}'s stack '{prefix}'"

    def _named(self, groups: Iterable[Iterable[str]]) -> list[str]:
        """The union of ``groups`` in first-seen order, each name in the donor's spelling."""
        donor_prefix = self.models[self.donor].layout.prefix
        out: dict[str, None] = {}
        for group in groups:
            for name in group:
                if self.raw is not None:
                    out[name] = None
                    continue
                name = spelled_like(name, (donor_prefix,))
                if name not in out and not any(o in out for o in other_spellings(name)):
                    out[name] = None
        return list(out)

    def _output_tensors(
        self, picks: list[SlicePicks], layer_map: list[tuple[int, tuple[tuple[str, int], ...]]]
    ) -> Iterator[OutputTensor]:
        """Every output tensor in output order: the main module's weights before its layer stack
        (its first slice, t = 0); each other module's weights before its stack, its layers and its
        weights after it; the main stack's layers (appended to ``layer_map``), and the main
        module's weights after it (its last slice, t = 1). Each group holds every tensor that any
        model it reads has (the donor's first, in its order, then the others' in theirs): a tensor
        that some of them lack is never dropped, it is an error (``_find_all``) or a stated
        exclusion (``_kept``)."""
        yield from self._module_weights(self._main, picks, before=True)
        for k in range(len(self.stacks)):
            if k != self._main:
                yield from self._module_weights(k, picks, before=True)
                yield from self._stack_tensors(k, picks, None)
                yield from self._module_weights(k, picks, before=False)
        yield from self._stack_tensors(self._main, picks, layer_map)
        yield from self._module_weights(self._main, picks, before=False)

    def _module_weights(self, stack: int, picks: list[SlicePicks], before: bool) -> Iterator[OutputTensor]:
        """Module ``stack``'s own weights outside its layers (``_own_weights``) before its layer
        stack (from its first slice, t = 0) or after it (its last slice, t = 1)."""
        lo, hi = self._ranges[stack]
        si = lo if before else hi - 1
        sp = picks[si]
        names = self._named(
            [
                self._own_weights(stack, self.donor, before),
                *(self._own_weights(stack, mi, before) for mi, _ in _readers(sp)),
            ]
        )
        base = sp.base[0] if sp.base else None
        for name in names:
            yield OutputTensor(
                name,
                si,
                0.0 if before else 1.0,
                [(mi, name, j) for mi, _, j in sp.entries],
                (base, name) if base is not None else None,
            )

    def _stack_tensors(
        self, stack: int, picks: list[SlicePicks], layer_map: list[tuple[int, tuple[tuple[str, int], ...]]] | None
    ) -> Iterator[OutputTensor]:
        """The layers of one stack, slice by slice, renumbered consecutively from 0 under the
        donor's prefix (each recorded in ``layer_map`` when given)."""
        from .params import layer_t

        if self.stacks[stack].layerless:
            return
        lo, hi = self._ranges[stack]
        out_prefix = self._prefix(stack, self.donor)
        out_layer = 0
        for si in range(lo, hi):
            sp = picks[si]
            readers = _readers(sp)
            for idx in range(sp.length):
                if layer_map is not None:
                    layer_map.append(
                        (out_layer, tuple((self.models[mi].label, start + idx) for mi, start, _ in sp.entries))
                    )
                suffixes = self._named(
                    self._layers(mi, self._prefix(stack, mi)).get(start + idx, ()) for mi, start in readers
                )
                for suffix in suffixes:
                    names = [
                        (mi, f"{self._prefix(stack, mi)}.{start + idx}.{suffix}", j) for mi, start, j in sp.entries
                    ]
                    base = None
                    if sp.base:
                        base_model, base_start = sp.base
                        base = (base_model, f"{self._prefix(stack, base_model)}.{base_start + idx}.{suffix}")
                    t = layer_t(idx, sp.length)
                    yield OutputTensor(f"{out_prefix}.{out_layer}.{suffix}", si, t, names, base)
                out_layer += 1

    def _kept(self, tensor: OutputTensor) -> OutputTensor | None:
        """The tensor as it is planned, or None when it is left out (and recorded as excluded): a
        buffer transformers rebuilds at load time (rotary ``inv_freq``, a causal mask) that some
        of the tensor's models lack. A raw merge follows its policy instead (``_raw_kept``)."""
        wanted = [(mi, name) for mi, name, _ in tensor.picks] + ([tensor.base] if tensor.base else [])
        stored = [(mi, self._stored(mi, name)) for mi, name in wanted]
        have = [(mi, n) for mi, n in stored if n is not None]
        if len(have) == len(stored):
            return tensor
        if self.raw is not None:
            return self._raw_kept(tensor, {mi for mi, _ in have})
        # a name only the donor has (it is not read here) is the donor's
        mi, name = have[0] if have else (self.donor, self._stored(self.donor, tensor.out_name) or "")
        info = self.models[mi].checkpoint.infos.get(name)
        if info is None or not is_recomputed_buffer(tensor.out_name, info.shape):
            return tensor  # not a rebuilt buffer: _find_all reports the models that lack it
        lacking = ", ".join(self.models[m].label for m, n in stored if n is None)
        for m, n in have:
            self.skipped[(m, n)] = f"a buffer transformers rebuilds at load time, missing from {lacking}"
        return None

    def _raw_kept(self, tensor: OutputTensor, having: set[int]) -> OutputTensor | None:
        """A raw merge's tensor that only the models ``having`` have: unchanged under the "error"
        policy (``_find_all`` names the models that lack it), left out under "intersection", and
        merged from the models that have it under "union"."""
        name = tensor.out_name
        if self.raw == "error":
            return tensor
        if self.raw == "intersection":
            wanted = {mi for mi, _, _ in tensor.picks} | ({tensor.base[0]} if tensor.base else set())
            lacking = self._labels(wanted - having)
            for mi in having:
                self.skipped[(mi, name)] = f"not in every model (missing from {lacking}; --tensor-intersection)"
            return None
        base = tensor.base if tensor.base is not None and tensor.base[0] in having else None
        if tensor.base is not None and base is None and self.method.base == "required":
            raise PlanError(
                f"tensor '{name}' is missing from the base model {self.models[tensor.base[0]].label}, which merge "
                f"method '{self.method.name}' merges every tensor onto; --tensor-union cannot merge it without the base"
            )
        picks = [p for p in tensor.picks if p[0] in having]
        if 0 < len(picks) < self.method.min_models:
            raise PlanError(
                f"tensor '{name}' is only in {self._labels(having)}, but merge method '{self.method.name}' needs "
                f"at least {self.method.min_models} models"
            )
        return replace(tensor, picks=picks, base=base)

    def _accounted(self, picks: list[SlicePicks], jobs: list[TensorJob]) -> tuple[Excluded, ...]:
        """Why each input tensor that no job reads is left out, grouped by model and reason (logged
        at info level). The reasons come from the slices alone, not from the enumeration of output
        tensors, so that an input tensor left out by mistake is a PlanError, never a silent loss."""
        read: dict[int, set[str]] = defaultdict(set)
        for job in jobs:
            for s in (*job.inputs, *job.row_sources):
                read[s.model].add(s.tensor)
        layers: dict[tuple[int, str], set[int]] = defaultdict(set)  # per (model, stack), the layers some slice reads
        for k, (lo, hi) in enumerate(self._ranges):
            if self.stacks[k].layerless:
                continue
            for sp in picks[lo:hi]:
                for mi, start in _readers(sp):
                    layers[(mi, self._prefix(k, mi))].update(range(start, start + sp.length))
        readers = {mi for sp in picks for mi, _ in _readers(sp)}
        # per module: the models its first and its last slice read
        ends = [
            ({mi for mi, _ in _readers(picks[lo])}, {mi for mi, _ in _readers(picks[hi - 1])})
            for lo, hi in self._ranges
        ]
        groups: dict[tuple[int, str], list[str]] = defaultdict(list)
        for mi, m in enumerate(self.models):
            for name in m.checkpoint.names():
                if name in read[mi]:
                    continue
                reason = self.skipped.get((mi, name)) or self._left_out_because(mi, name, layers, readers, ends)
                if reason is None:
                    raise PlanError(
                        f"tensor '{name}' of {m.label} would be left out of the output: no output tensor reads it"
                    )
                groups[(mi, reason)].append(name)
        excluded = tuple(Excluded(mi, reason, tuple(names)) for (mi, reason), names in groups.items())
        for e in excluded:
            shown = ", ".join(e.tensors[:3]) + (f" and {len(e.tensors) - 3} more" if len(e.tensors) > 3 else "")
            n = len(e.tensors)
            log.info(
                "not in the output: %d tensor%s of %s (%s): %s",
                n,
                "s" if n > 1 else "",
                self.models[e.model].label,
                e.reason,
                shown,
            )
        return excluded

    def _left_out_because(
        self,
        mi: int,
        name: str,
        layers: dict[tuple[int, str], set[int]],
        readers: set[int],
        ends: list[tuple[set[int], set[int]]],
    ) -> str | None:
        """Why the slices do not read tensor ``name`` of model ``mi``; None when they should."""
        layout = self.models[mi].layout
        if mi not in readers:
            if self.config.base_model is not None and mi == self._model(self.config.base_model):
                return f"merge method '{self.method.name}' does not use the base model"
            return "no slice reads this model"
        for st in self.stacks:
            prefix = st.prefixes[mi]
            if not prefix or not name.startswith(prefix + "."):
                continue
            index, _, suffix = name[len(prefix) + 1 :].partition(".")
            if index.isdigit() and suffix in self._layers(mi, prefix).get(int(index), ()):
                if (mi, prefix) not in layers:
                    return f"a layer of module '{st.group.module}', which does not read this model"
                return None if int(index) in layers[(mi, prefix)] else "a layer outside the slices' layer ranges"
        if name not in layout.pre and name not in layout.post:
            return None
        k = self._owner(mi, name)
        (first, last), st = ends[k], self.stacks[k]
        if st.layerless:
            return None if mi in first else f"a weight of module '{st.group.module}', which does not read this model"
        # the language model's module as without modules; another one named
        stack, whose = (
            ("the layer stack", "the") if k == self._main else (f"the layer stack of module '{st.group.module}'", "its")
        )
        before = self._before(k, mi, name)
        if before and mi not in first:
            return f"before {stack}, which {whose} first slice takes from {self._labels(first)}"
        if not before and mi not in last:
            return f"after {stack}, which {whose} last slice takes from {self._labels(last)}"
        return None

    def _labels(self, models: Iterable[int]) -> str:
        return ", ".join(self.models[m].label for m in sorted(models))

    def _untie_for_heads(self, out_config: dict[str, Any], jobs: list[TensorJob]) -> None:
        """A written head is the output's head: config.json must not tie it to the embedding. One
        warning says which models' embeddings stood in for their heads."""
        donor = self.donor
        for job in jobs:
            if not is_head_name(job.out_name):
                continue
            tied = ties_embeddings(out_config)
            untie = tied is True or (tied is None and self._stored(donor, job.out_name) is None)
            if untie:
                set_untied(out_config)
            stand_ins = self.tied_heads.get(job.out_name)
            if stand_ins:
                log.warning(
                    "'%s': no head in %s (tied embeddings), so the input embedding stands in for it%s",
                    job.out_name,
                    self._labels(stand_ins),
                    "; the output has its own head (tie_word_embeddings: false)" if untie else "",
                )
            elif untie:
                log.warning("the output has its own head '%s' (tie_word_embeddings: false)", job.out_name)

    def _job(self, tensor: OutputTensor, device: str) -> TensorJob:
        """One output tensor's job: its inputs found and shape-checked, parameters resolved and
        validated, and the kernel chosen."""
        method, out_name = self.method, tensor.out_name
        wanted = [(mi, name) for mi, name, _ in tensor.picks] + ([tensor.base] if tensor.base else [])
        found = self._find_all(out_name, wanted)
        sources = tuple(Source(mi, name) for (mi, _, _), name in zip(tensor.picks, found))
        base = Source(tensor.base[0], found[-1]) if tensor.base else None
        inputs = (base, *sources) if base else sources  # as TensorJob.inputs
        infos = [self.models[s.model].checkpoint.infos[s.tensor] for s in inputs]
        ref_info = infos[0]
        aligned = self._is_aligned(out_name, inputs, infos)
        shape = (self.vocab.rows, *ref_info.shape[1:]) if aligned and self.vocab else ref_info.shape
        self._check_shapes(out_name, inputs, infos, aligned)
        params = self._global_params(tensor.slice, out_name, tensor.t)
        mparams = tuple(
            self._model_params(tensor.slice, j, sources[k].tensor, tensor.t, self.models[mi].label)
            for k, (mi, _, j) in enumerate(tensor.picks)
        )
        self._validate(out_name, params, mparams, sources, base)
        out_dtype = self._out_dtype(ref_info.dtype)
        row_sources: tuple[Source, ...] = ()
        if aligned and self.vocab is not None:
            missing = sorted(self.vocab.default_models() - {s.model for s in inputs})
            found_rows = self._find_all(out_name, [(m, out_name) for m in missing])
            row_sources = tuple(Source(m, name) for m, name in zip(missing, found_rows))
        mapped = [self.models[s.model].checkpoint.mapped(s.tensor) for s in inputs]
        kernel = choose(
            method,
            out_name,
            params,
            list(mparams),
            [JobInput(i.dtype, tuple(i.shape), m) for i, m in zip(infos, mapped)],
            base is not None,
            tuple(shape),
            out_dtype,
            aligned,
            device,
        )
        return TensorJob(
            out_name=out_name,
            shape=shape,
            out_dtype=out_dtype,
            sources=sources,
            model_params=mparams,
            base=base,
            params=params,
            input_bytes=sum(self._read_bytes(s, i) for s, i in zip(inputs, infos)),
            output_bytes=nbytes(out_dtype, math.prod(shape)),
            aligned=aligned,
            row_sources=row_sources,
            kernel=kernel,
        )

    def _read_bytes(self, src: Source, info: Any) -> int:
        """The bytes reading ``src`` reads from disk: its own, or for a recipe stage's tensor
        (computed as it is read) what computing it reads."""
        read = getattr(self.models[src.model].checkpoint, "read_bytes", None)
        return int(read(src.tensor)) if read is not None else int(info.nbytes)

    def _check_shapes(self, out_name: str, inputs: tuple[Source, ...], infos: list[Any], aligned: bool) -> None:
        """Every input of the first's shape (rows aside, for a re-laid-out vocabulary tensor)."""
        want = infos[0].shape[1:] if aligned else infos[0].shape
        for s, info in zip(inputs, infos):
            if (info.shape[1:] if aligned else info.shape) != want:
                hint = ""
                if is_embedding_name(out_name) and self.raw is None:
                    hint = " (embedding sizes differ: vocabulary handling needs the tokenizer options)"
                raise PlanError(
                    f"tensor '{out_name}': {self.models[s.model].label} has shape {shape_text(info.shape)} "
                    f"but {self.models[inputs[0].model].label} has {shape_text(infos[0].shape)}{hint}"
                )

    def _validate(
        self,
        out_name: str,
        params: dict[str, Any],
        mparams: tuple[dict[str, Any], ...],
        sources: tuple[Source, ...],
        base: Source | None,
    ) -> None:
        """The method's own checks and model counts, with the resolved parameters of one tensor."""
        method = self.method
        if method.validate is not None:
            try:
                method.validate(params, list(mparams))
            except ValueError as exc:
                raise self._config_error(f"{exc} (tensor '{out_name}')", ("parameters",)) from None
        reason = method.base_needed_for(params) if method.base_needed_for is not None and base is None else None
        if reason:
            raise self._config_error(f"merge method '{method.name}' needs a base_model here: {reason}", ("base_model",))
        # a slice holding only the base model is allowed (the base passes through)
        if 0 < len(sources) < method.min_models or (not sources and base is None):
            given = [k for k in ("modules", "models") if getattr(self.config, k, None)]
            raise self._config_error(
                f"merge method '{method.name}' needs at least {method.min_models} model(s) besides the base, got {len(sources)}",
                (given[0] if given else "slices",),
            )

    def embedding_rows(self, model: int) -> int | None:
        """Rows of the model's token embedding (its vocabulary size as the weights see it)."""
        m = self.models[model]
        name = m.layout.input_embedding
        if name is None or name not in m.checkpoint:
            return None
        shape = m.checkpoint.infos[name].shape
        return shape[0] if shape else None

    def _is_aligned(self, out_name: str, sources: tuple[Source, ...], infos: list[Any]) -> bool:
        """Whether this tensor's rows follow the vocabulary and must be re-laid out."""
        if self.vocab is None or not self.vocab.changes_rows or not is_embedding_name(out_name):
            return False
        rows = [self.embedding_rows(s.model) for s in sources]
        if not all(info.shape and info.shape[0] == r for info, r in zip(infos, rows)):
            return False
        return any(self.vocab.row_maps[s.model] is not None for s in sources)

    @staticmethod
    def _listed(group: Any, ref: Any) -> bool:
        """Whether ``ref`` is one of the models a group lists (always, for slices)."""
        if group.models is not None:
            return any(str(m.model) == str(ref) for m in group.models)
        return True

    @property
    def donor(self) -> int:
        """The model whose config.json, tokenizer and tensor names the output follows: the base, else the first."""
        if self.config.base_model is not None:
            return self._model(self.config.base_model)
        return 0

    def _out_dtype(self, in_code: str) -> str:
        name = self.config.out_dtype or self.config.dtype
        if in_code not in ("F32", "F16", "BF16", "F64") or name is None:
            return in_code
        return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[name]

    def _read_position(self, job: TensorJob) -> tuple[int, str, int]:
        first = job.sources[0] if job.sources else job.inputs[0]
        info = self.models[first.model].checkpoint.infos[first.tensor]
        return (first.model, info.file, info.start)

    def _out_config(self, donor: int, out_layers: list[int]) -> dict[str, Any]:
        """The donor's config.json with the output dtype, and the layer count (and per-layer
        lists) of each stack that slices rebuilt."""
        import copy

        cfg = copy.deepcopy(self.models[donor].config)
        dtype = self.config.out_dtype or self.config.dtype
        if dtype:
            present = [k for k in ("torch_dtype", "dtype") if k in cfg]
            for k in present or ["torch_dtype"]:
                cfg[k] = dtype
            for sub in ("text_config",):
                if isinstance(cfg.get(sub), dict):
                    for k in ("torch_dtype", "dtype"):
                        if k in cfg[sub]:
                            cfg[sub][k] = dtype
        layout = self.models[donor].layout
        for stack, (st, num_out_layers) in enumerate(zip(self.stacks, out_layers)):
            if st.group.slices is None or st.layerless:
                continue  # whole models, or no layers: the layer count is the donor's
            if st.main:
                key = layout.count_key
                if key is None:
                    log.warning("config.json has no layer count key; the output keeps the donor's value")
                    continue
            else:
                prefix = self._prefix(stack, donor)
                key = stack_count_key(cfg, prefix, layout.stacks[prefix], exclude=layout.count_key)
                if key is None:
                    log.warning(
                        "config.json has no layer count for the layer stack '%s' (module '%s'); the output keeps the donor's value",
                        prefix,
                        st.group.module,
                    )
                    continue
            self._rewrite_layer_lists(cfg, key, list(st.slices), num_out_layers)
        return cfg

    def _rewrite_layer_lists(self, cfg: dict[str, Any], key: str, slices: list[Any], num_out_layers: int) -> None:
        """Set the layer count and rebuild every per-layer list (``layer_types``...) slice by slice."""
        parent = _get_parent(cfg, key)
        old_count = parent[key.split(".")[-1]]
        _set_nested(cfg, key, num_out_layers)
        for list_key, value in list(parent.items()):
            if list_key in LAYER_INDEX_LISTS or not isinstance(value, list) or len(value) != old_count:
                continue
            rebuilt = []
            for sl in slices:
                src = sl.sources[0]
                src_cfg_parent = _get_parent(self.models[self._model(src.model)].config, key)
                src_list = src_cfg_parent.get(list_key)
                if not isinstance(src_list, list):
                    src_list = value
                start, stop = src.layer_range
                rebuilt.extend(src_list[start:stop])
            if len(rebuilt) == num_out_layers:
                parent[list_key] = rebuilt
        self._rewrite_layer_indices(parent, key, slices)

    def _rewrite_layer_indices(self, parent: dict[str, Any], key: str, slices: list[Any]) -> None:
        """Renumber the lists of layer indices (``mlp_only_layers``, ``moe_layers``) for the new
        stack; a ``decoder_sparse_step`` pattern becomes an explicit ``mlp_only_layers``, since
        slicing breaks the stride."""
        origin = []  # per output layer: (the source model's config level holding the count, source layer)
        for sl in slices:
            src = sl.sources[0]
            src_parent = _get_parent(self.models[self._model(src.model)].config, key)
            origin += [(src_parent, j) for j in range(*src.layer_range)]
        for list_key in LAYER_INDEX_LISTS:
            if isinstance(parent.get(list_key), list):
                parent[list_key] = [i for i, (p, j) in enumerate(origin) if j in (p.get(list_key) or ())]

        def dense(p: dict[str, Any], j: int) -> bool:
            step = p.get("decoder_sparse_step") or 1
            return j in (p.get("mlp_only_layers") or ()) or (step > 1 and (j + 1) % step != 0)

        if (parent.get("decoder_sparse_step") or 1) > 1 or any(
            (p.get("decoder_sparse_step") or 1) > 1 for p, _ in origin
        ):
            parent["decoder_sparse_step"] = 1
            parent["mlp_only_layers"] = [i for i, (p, j) in enumerate(origin) if dense(p, j)]


# config keys that list layer indices (not one entry per layer): renumbered when slicing
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")


def check_architectures(models: list[InputModel], donor: int, allow_crimes: bool) -> None:
    def arch(m: InputModel) -> tuple[tuple[str, ...], Any]:
        return (tuple(m.config.get("architectures") or ()), m.config.get("model_type"))

    ref = arch(models[donor])
    for m in models:
        if arch(m) != ref:
            if allow_crimes:
                log.warning(
                    "merging %s (%s) with %s (%s) because --allow-crimes is set",
                    m.label,
                    arch(m),
                    models[donor].label,
                    ref,
                )
            else:
                raise ArchitectureError(
                    f"{m.label} is a {arch(m)[0] or arch(m)[1]} but {models[donor].label} is a {ref[0] or ref[1]}; "
                    "pass --allow-crimes to merge different architectures"
                )
