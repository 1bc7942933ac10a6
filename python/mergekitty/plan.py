"""Turn a config and the input headers into a frozen list of tensor jobs. No tensor is read here.

Every user mistake that can be found without reading weights (a missing tensor,
a shape mismatch, a bad parameter value, an output directory that is an input)
surfaces here, before the merge starts.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architecture.layout import ModelLayout, is_embedding_name, other_spellings, set_vocab_size
from .errors import ArchitectureError, ConfigError, PlanError
from .io.dtypes import nbytes
from .kernels import JobInput, Kernel, Torch, choose

if TYPE_CHECKING:
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
class PlannedModel:
    """An input as the plan records it: enough to open it again, in this process or another."""

    label: str  # the model reference as the config wrote it
    path: Path  # the resolved local directory
    num_layers: int
    tokenizer_dir: Path  # where its tokenizer files are (a model+lora input's adapter when it ships one)
    adapter: Path | None = None  # model+lora: the resolved adapter directory
    lora_merge_dtype: str | None = None  # model+lora: dtype the adapted tensors are rounded to

    @property
    def ref(self) -> str:
        return self.label

    def open(self, device: str = "cpu") -> Any:
        """The checkpoint (io.checkpoint.Checkpoint, or lora.apply's adapted view of it)."""
        from .io.checkpoint import Checkpoint

        checkpoint = Checkpoint(self.path, label=self.label)
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


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor before its job is built: (model, input name, source index) per
    non-base input, the base's (model, input name), its slice and layer position ``t``."""

    out_name: str
    slice: int
    t: float
    picks: list[tuple[int, str, int]]
    base: tuple[int, str] | None


class Planner:
    """Builds a MergePlan. ``open_model(ref) -> (path, Checkpoint, config dict)`` does the I/O of headers."""

    def __init__(self, config: Any, method: MergeMethod, models: list[InputModel], options: Any) -> None:
        from .params import ParameterResolver

        self.config = config
        self.method = method
        self.models = models
        self.options = options
        self.index_of = {str(m.ref): i for i, m in enumerate(models)}
        self.resolver = ParameterResolver(config)
        self.used_param_names: set[str] = set()
        self.vocab: VocabPlan | None = None  # the output vocabulary, given to plan()

    # ---------------------------------------------------------------- helpers
    def _model(self, ref: Any) -> int:
        return self.index_of[str(ref)]

    def _find(self, model: int, name: str, out_name: str) -> str:
        """The name of ``name`` in ``model``, falling back from a missing head to tied embeddings."""
        m = self.models[model]
        if name in m.checkpoint:
            return name
        for other in other_spellings(name):  # the same tensor, saved under the other VLM naming scheme
            if other in m.checkpoint:
                return other
        if is_embedding_name(name) and name in self.models[self.donor].layout.post and m.layout.input_embedding:
            # a head (lm_head, embed_out...) missing from a model with tied embeddings: its input embedding is the head
            return m.layout.input_embedding
        close = difflib.get_close_matches(name, m.checkpoint.names(), n=1)
        hint = f" (closest: '{close[0]}')" if close else ""
        raise PlanError(f"model {m.label}: tensor '{name}' (needed for output '{out_name}') is missing{hint}")

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
                raise ConfigError(
                    f"merge method '{self.method.name}' needs parameter '{spec.name}' {where}", key="parameters"
                )
            return spec.default
        try:
            return spec.check(value)
        except ValueError as exc:
            if origin is not None and hasattr(self.config, "error"):
                raise self.config.error(f"{exc} {where}", key=origin()) from None
            raise ConfigError(f"{exc} {where}", key=f"parameters.{spec.name}") from None

    # ---------------------------------------------------------------- planning
    def plan(
        self,
        slices: list[Any],
        vocab: VocabPlan | None = None,
        random_seed: int = 0,
        device: str = "cpu",
        shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    ) -> MergePlan:
        """The plan of ``slices`` for the output vocabulary ``vocab`` (tokenizer.build.VocabPlan or
        None), with kernels chosen for ``device`` and the output laid out in shards of
        ``shard_size_bytes``."""
        self.vocab = vocab
        method = self.method
        donor = self.donor
        base_ref = self.config.base_model
        if method.base == "required" and base_ref is None:
            raise ConfigError(f"merge method '{method.name}' needs a base_model", key="base_model")
        picks = [self._slice_picks(si, sl, base_ref) for si, sl in enumerate(slices)]
        layer_map: list[tuple[int, tuple[tuple[str, int], ...]]] = []
        jobs = _placed(
            [self._job(tensor, device) for tensor in self._output_tensors(picks, layer_map)], shard_size_bytes
        )
        out_config = self._out_config(donor, slices, len(layer_map))
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
        )

    def _slice_picks(self, si: int, sl: Any, base_ref: Any) -> SlicePicks:
        """Which models a slice reads, from which layer, and which is its base; checks the ranges."""
        method = self.method
        uses_base = method.base != "ignored"
        slice_base = getattr(sl, "base_model", None) or base_ref
        entries, base_entry = [], None
        lengths = set()
        for j, src in enumerate(sl.sources):
            start, stop = src.layer_range
            mi = self._model(src.model)
            layout = self.models[mi].layout
            if stop > layout.num_layers:
                raise ConfigError(
                    f"layer_range [{start}, {stop}) is beyond the {layout.num_layers} layers of {self.models[mi].label}",
                    key=f"slices[{si}].sources[{j}].layer_range",
                )
            lengths.add(stop - start)
            is_base = slice_base is not None and str(src.model) == str(slice_base)
            if uses_base and is_base:
                base_entry = (mi, start)
            elif is_base and not self._listed(src.model):
                continue  # a base the method does not use, added only to carry the config
            else:
                entries.append((mi, start, j))
        if len(lengths) > 1:
            raise ConfigError(
                f"all sources of a slice must cover the same number of layers (got {sorted(lengths)})",
                key=f"slices[{si}].sources",
            )
        if uses_base and base_entry is None and slice_base is not None:
            base_entry = (self._model(slice_base), sl.sources[0].layer_range[0])
        if not entries and not (uses_base and base_entry):
            raise ConfigError("a slice needs at least one source model", key=f"slices[{si}].sources")
        if method.max_models is not None and len(entries) > method.max_models:
            raise ConfigError(
                f"merge method '{method.name}' takes at most {method.max_models} model(s) per tensor, got {len(entries)}",
                key=f"slices[{si}].sources" if self.config.slices else "models",
            )
        return SlicePicks(entries, base_entry, lengths.pop() if lengths else 0)

    def _output_tensors(
        self, picks: list[SlicePicks], layer_map: list[tuple[int, tuple[tuple[str, int], ...]]]
    ) -> Iterator[OutputTensor]:
        """Every output tensor in output order: the donor's pre weights (first slice, t = 0), each
        slice's layers renumbered consecutively (appended to ``layer_map``), the post weights
        (last slice, t = 1)."""
        from .params import layer_t

        donor_layout = self.models[self.donor].layout

        def whole(name: str, si: int, t: float) -> OutputTensor:
            sp = picks[si]
            base = (sp.base[0], name) if sp.base else None
            return OutputTensor(name, si, t, [(mi, name, j) for mi, _, j in sp.entries], base)

        for name in donor_layout.pre:
            yield whole(name, 0, 0.0)
        for si, sp in enumerate(picks):
            for idx in range(sp.length):
                out_layer = len(layer_map)
                lead = (sp.entries[0][0], sp.entries[0][1]) if sp.entries else sp.base
                assert lead is not None  # _slice_picks: a slice has sources or a base
                lead_model, lead_start = lead
                layer_map.append(
                    (out_layer, tuple((self.models[mi].label, start + idx) for mi, start, _ in sp.entries))
                )
                for suffix in self.models[lead_model].layout.layer_tensors.get(lead_start + idx, ()):
                    names = [
                        (mi, self.models[mi].layout.layer_name(start + idx, suffix), j) for mi, start, j in sp.entries
                    ]
                    base = None
                    if sp.base:
                        base = (sp.base[0], self.models[sp.base[0]].layout.layer_name(sp.base[1] + idx, suffix))
                    t = layer_t(idx, sp.length)
                    yield OutputTensor(donor_layout.layer_name(out_layer, suffix), si, t, names, base)
        for name in donor_layout.post:
            yield whole(name, len(picks) - 1, 1.0)

    def _job(self, tensor: OutputTensor, device: str) -> TensorJob:
        """One output tensor's job: its inputs found and shape-checked, parameters resolved and
        validated, and the kernel chosen."""
        method, out_name = self.method, tensor.out_name
        sources = tuple(Source(mi, self._find(mi, name, out_name)) for mi, name, _ in tensor.picks)
        base = Source(tensor.base[0], self._find(tensor.base[0], tensor.base[1], out_name)) if tensor.base else None
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
            row_sources = tuple(Source(m, self._find(m, out_name, out_name)) for m in missing)
        mapped = [self.models[s.model].checkpoint.view(s.tensor) is not None for s in inputs]
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
            input_bytes=sum(i.nbytes for i in infos),
            output_bytes=nbytes(out_dtype, math.prod(shape)),
            aligned=aligned,
            row_sources=row_sources,
            kernel=kernel,
        )

    def _check_shapes(self, out_name: str, inputs: tuple[Source, ...], infos: list[Any], aligned: bool) -> None:
        """Every input of the first's shape (rows aside, for a re-laid-out vocabulary tensor)."""
        want = infos[0].shape[1:] if aligned else infos[0].shape
        for s, info in zip(inputs, infos):
            if (info.shape[1:] if aligned else info.shape) != want:
                hint = ""
                if is_embedding_name(out_name):
                    hint = " (embedding sizes differ: vocabulary handling needs the tokenizer options)"
                raise PlanError(
                    f"tensor '{out_name}': {self.models[s.model].label} has shape {list(info.shape)} "
                    f"but {self.models[inputs[0].model].label} has {list(infos[0].shape)}{hint}"
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
                raise ConfigError(f"{exc} (tensor '{out_name}')", key="parameters") from None
        reason = method.base_needed_for(params) if method.base_needed_for is not None and base is None else None
        if reason:
            raise ConfigError(f"merge method '{method.name}' needs a base_model here: {reason}", key="base_model")
        # a slice holding only the base model is allowed (the base passes through)
        if 0 < len(sources) < method.min_models or (not sources and base is None):
            raise ConfigError(
                f"merge method '{method.name}' needs at least {method.min_models} model(s) besides the base, got {len(sources)}",
                key="models" if self.config.models else "slices",
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

    def _listed(self, ref: Any) -> bool:
        if self.config.models:
            return any(str(m.model) == str(ref) for m in self.config.models)
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

    def _out_config(self, donor: int, slices: list[Any], num_out_layers: int) -> dict[str, Any]:
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
        if self.config.slices:
            key = self.models[donor].layout.count_key
            if key is None:
                log.warning("config.json has no layer count key; the output keeps the donor's value")
            else:
                self._rewrite_layer_lists(cfg, key, slices, num_out_layers)
        return cfg

    def _rewrite_layer_lists(self, cfg: dict[str, Any], key: str, slices: list[Any], num_out_layers: int) -> None:
        """Set the layer count and rebuild every per-layer list (``layer_types``...) slice by slice."""
        parent = _get_parent(cfg, key)
        old_count = parent[key.split(".")[-1]]
        _set_nested(cfg, key, num_out_layers)
        for list_key, value in list(parent.items()):
            if (
                list_key in LAYER_INDEX_LISTS
                or not isinstance(value, list)
                or len(value) != old_count
                or old_count == num_out_layers
                and not self.config.slices
            ):
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
