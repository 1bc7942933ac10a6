"""The YAML merge configuration: schema, loading, and error messages that point at a line.

``load_config(text)`` / ``load_config_file(path)`` give a frozen ``MergeConfiguration``
or raise ``ConfigError`` naming the key path (``slices[1].sources[0].layer_range``) and
its line. No pydantic error or traceback escapes. This module does no I/O apart from
reading the config file, and never imports torch or transformers.

The method name is not checked while parsing (configs for methods this version lacks
still parse); ``check_method(config)`` does that, with a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .limits import MAX_CONFIG_BYTES, MAX_PAD_TO_MULTIPLE_OF, MAX_TOKEN_ID
from .refs import ModelReference
from .yaml_lines import DuplicateKeyError, YamlSyntaxError, format_path, line_of, load_with_lines

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "ConditionalParameter",
    "ParameterSetting",
    "ScalarOrGradient",
    "InputSliceDefinition",
    "InputModelDefinition",
    "OutputSliceDefinition",
    "OutputModuleDefinition",
    "ModelTokenEmbedding",
    "ZeroEmbedding",
    "TokenEmbeddingConfig",
    "TokenizerConfig",
    "LocatedConfig",
    "MergeConfiguration",
    "ConfigKind",
    "MERGE_CONFIG",
    "DTYPE_ALIASES",
    "normalize_dtype",
    "config_from_data",
    "load_config",
    "load_config_file",
    "check_method",
    "effective_tokenizer_source",
    "parameter_name_problems",
    "report_ignored",
]

# Top-level keys that other tools put in a config and that are accepted and ignored.
IGNORED_TOP_LEVEL_KEYS = ("name",)

# How an ignored key is explained: the other tools' schemas drop unknown keys without a word, so
# a published recipe holding one (a typo such as 'dype', a key of another tool's version) was
# merged without it; so is it here, loudly. ``strict`` makes each one the error it is.
_IGNORED_AS = "is ignored, as mergekit ignores it"

# Keys of the existing tools that this version does not support, with what to do instead.
UNSUPPORTED_KEYS = {
    "input_model_parameters": "'input_model_parameters' is not supported; put per-model parameters under models[*].parameters",
}

DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
VALID_DTYPES = ("bfloat16", "float16", "float32")


# --------------------------------------------------------------------------- helpers


def fail(message: str, subpath: tuple = (), key: str | None = None, unknown: str | None = None) -> PydanticCustomError:
    """An error pydantic reports verbatim; ``subpath`` extends its location, ``key`` names a field.
    ``unknown`` (its did-you-mean) marks a key the other tools would ignore: the loader drops it
    with a warning (``ConfigKind.from_data``) unless strict."""
    ctx: dict[str, Any] = {"message": message}
    if unknown is not None:
        ctx["_mk_unknown"] = unknown
    if subpath:
        ctx["_mk_subpath"] = tuple(subpath)
    if key is not None:
        ctx["_mk_key"] = key
    return PydanticCustomError("mergekitty", "{message}", ctx)


def describe(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {text!r}"
    if value is None:
        return "null (no value)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- parameter values

ScalarOrGradient = bool | int | float | list[int | float]

_SETTING_HELP = (
    "a number, true/false, a list of numbers (a gradient across layers), or a list of {value, filter} entries"
)


def _check_scalar_or_gradient(value: Any, subpath: tuple = ()) -> Any:
    if isinstance(value, str):
        # the other tools accept a string value (e.g. `int_space: cs`); a method that reads it
        # converts it or reports it with its key (ParamSpec.check)
        return value
    if isinstance(value, bool) or _is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(f"parameter values must be finite numbers, got {value!r}", subpath)
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise fail("a gradient needs at least one value, got an empty list", subpath)
        for i, item in enumerate(value):
            if not _is_number(item):
                raise fail(f"gradient values must be numbers, got {describe(item)}", (*subpath, i))
            if isinstance(item, float) and not math.isfinite(item):
                raise fail(f"gradient values must be finite numbers, got {item!r}", (*subpath, i))
        return list(value)
    raise fail(f"a parameter value must be a number, true/false or a list of numbers; got {describe(value)}", subpath)


class ConditionalParameter(BaseModel):
    """``{value: <scalar or gradient>, filter: <substring of the tensor name>}``.

    A filter of None or ``"*"`` matches every tensor.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: Any
    filter: str | None = None

    @field_validator("value", mode="plain")
    @classmethod
    def _value(cls, value: Any) -> Any:
        return _check_scalar_or_gradient(value)

    @field_validator("filter", mode="before")
    @classmethod
    def _filter(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise fail(f"a filter must be a string (a part of the tensor name), got {describe(value)}")
        return value


def _conditional(value: dict, subpath: tuple) -> ConditionalParameter:
    fields = ("value", "filter")
    for key in value:
        if key not in fields:
            raise fail(
                f"unknown key '{key}' in a conditional parameter (expected 'value' and optionally 'filter'){suggest(key, fields)}",
                (*subpath, key),
                unknown=suggest(key, fields) or " (keys here: value, filter)",
            )
    if "value" not in value:
        raise fail("a conditional parameter needs a 'value'", subpath)
    filt = value.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise fail(f"a filter must be a string (a part of the tensor name), got {describe(filt)}", (*subpath, "filter"))
    return ConditionalParameter.model_construct(
        value=_check_scalar_or_gradient(value["value"], (*subpath, "value")), filter=filt
    )


def _validate_setting(value: Any) -> Any:
    if isinstance(value, ConditionalParameter):
        return value
    if isinstance(value, str):
        return _check_scalar_or_gradient(value)
    if isinstance(value, bool) or _is_number(value):
        return _check_scalar_or_gradient(value)
    if isinstance(value, dict):
        return _conditional(value, ())
    if isinstance(value, (list, tuple)):
        if not value:
            raise fail(f"a parameter value must be {_SETTING_HELP}; got an empty list")
        if all(isinstance(v, (dict, ConditionalParameter)) for v in value):
            return [v if isinstance(v, ConditionalParameter) else _conditional(v, (i,)) for i, v in enumerate(value)]
        if any(isinstance(v, (dict, ConditionalParameter)) for v in value):
            raise fail("a parameter list must be all numbers (a gradient) or all {value, filter} entries, not a mix")
        return _check_scalar_or_gradient(value)
    raise fail(f"a parameter value must be {_SETTING_HELP}; got {describe(value)}")


ParameterSetting = Annotated[Any, PlainValidator(_validate_setting)]
"""``ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient`` (validated)."""

Parameters = dict[str, ParameterSetting]


# --------------------------------------------------------------------------- model references in unions


def _nested(cls: type[BaseModel], value: Any, subpath: tuple = ()) -> Any:
    """Validate ``value`` as ``cls`` inside another validator, keeping the inner error's key path."""
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            if err["type"] == "extra_forbidden":
                # a key the other tools ignore: the loader drops it with a warning, then validates again
                loc = tuple(err["loc"])
                parent = _model_at(cls, loc[:-1])
                fields = list(parent.model_fields) if parent is not None else []
                hint = suggest(loc[-1], fields) or (f" (keys here: {', '.join(fields)})" if fields else "")
                raise fail(f"unknown key '{loc[-1]}'{hint}", (*subpath, *loc), unknown=hint) from None
        loc, msg = _translate_errors(exc, cls)[0]
        raise fail(msg, (*subpath, *loc)) from None


def model_ref(value: Any) -> ModelReference:
    if isinstance(value, ModelReference):
        return value
    if not isinstance(value, (str, dict)):
        raise fail(f"a model reference must be a path or hub id (a string), got {describe(value)}")
    return _nested(ModelReference, value)


def _tokenizer_source(value: Any) -> Any:
    if value in ("union", "base"):
        return value
    if isinstance(value, str) and value.strip() == "":
        raise fail("a tokenizer source must be 'union', 'base' or a model; got an empty string")
    return model_ref(value)


TokenizerSource = Annotated[Any, PlainValidator(_tokenizer_source)]
"""``"union" | "base" | ModelReference``."""


# --------------------------------------------------------------------------- slices and models


class InputSliceDefinition(BaseModel):
    """A half-open range of layers ``[start, stop)`` of one model, zero-indexed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelReference
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Parameters | None = None

    @field_validator("layer_range", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise fail(f"layer_range must be two integers [start, stop], got {describe(value)}")
        if len(value) != 2:
            raise fail(f"layer_range must be two integers [start, stop], got {len(value)} value(s)")
        return value

    @field_validator("layer_range", mode="after")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, stop = value
        # [0, 0]: the one range of a module without layers (a projector), checked when planning
        if (start, stop) != (0, 0) and (start < 0 or stop <= start):
            raise fail(bad_layer_range(start, stop))
        return value


def bad_layer_range(start: int, stop: int) -> str:
    return (
        f"layer_range [{start}, {stop}] must satisfy 0 <= start < stop "
        "(zero-indexed and half-open: layers start .. stop-1)"
    )


class InputModelDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelReference
    parameters: Parameters | None = None


class OutputSliceDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[InputSliceDefinition]
    base_model: ModelReference | None = None
    residual_weight: float | None = None  # accepted for compatibility; unused (as in mergekit)
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> OutputSliceDefinition:
        if not self.sources:
            raise fail("a slice needs at least one source", key="sources")
        return self


class OutputModuleDefinition(BaseModel):
    """One module of a ``modules:`` config (a language model, a vision tower...): its own
    ``slices`` or ``models`` (exactly one), and ``parameters`` that rank between the slices'
    and the top-level ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slices: list[OutputSliceDefinition] | None = None
    models: list[InputModelDefinition] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if data is None:
            raise fail("the module is empty; give it 'slices' (layer ranges) or 'models' (whole models)")
        return data

    @model_validator(mode="after")
    def _one_of(self) -> OutputModuleDefinition:
        if self.slices is not None and self.models is not None:
            raise fail("give the module either 'slices' or 'models', not both", key="models")
        if self.slices is None and self.models is None:
            raise fail("the module needs 'slices' (layer ranges) or 'models' (whole models)")
        if self.slices is not None and not self.slices:
            raise fail("'slices' is empty; list at least one output slice", key="slices")
        if self.models is not None and not self.models:
            raise fail("'models' is empty; list at least one model", key="models")
        return self


# --------------------------------------------------------------------------- tokenizer


class ModelTokenEmbedding(BaseModel):
    """``{kind: model_token, model: <ref>, token: <str>}`` or ``... token_id: <int>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["model_token"] = "model_token"
    model: ModelReference
    token_id: StrictInt | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise fail("give exactly one of 'token' and 'token_id'")
        if self.token_id is not None and not 0 <= self.token_id < MAX_TOKEN_ID:
            raise fail(f"token_id must be >= 0 and below {MAX_TOKEN_ID:,}, got {self.token_id}", key="token_id")
        return self


class ZeroEmbedding(BaseModel):
    """``{kind: zero}``: a zero vector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["zero"] = "zero"


_EMBEDDING_KINDS = {"model_token": ModelTokenEmbedding, "zero": ZeroEmbedding}


def _embedding_source(value: Any) -> Any:
    if value is None or isinstance(value, (ModelReference, ModelTokenEmbedding, ZeroEmbedding)):
        return value
    if isinstance(value, dict) and "kind" in value:
        kind = value["kind"]
        cls = _EMBEDDING_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise fail(
                f"unknown embedding source kind {kind!r}; expected 'model_token' or 'zero'{suggest(str(kind), _EMBEDDING_KINDS)}",
                ("kind",),
            )
        return _nested(cls, value)
    return model_ref(value)


class TokenEmbeddingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Annotated[Any, PlainValidator(_embedding_source)] = None
    """``ModelReference | ModelTokenEmbedding | ZeroEmbedding | None``."""
    force: StrictBool = False


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: TokenizerSource = "union"
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: StrictInt | None = None

    @field_validator("pad_to_multiple_of", mode="after")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise fail(f"pad_to_multiple_of must be a positive integer, got {value}")
        if value is not None and value > MAX_PAD_TO_MULTIPLE_OF:
            raise fail(
                f"pad_to_multiple_of is {value:,}; at most {MAX_PAD_TO_MULTIPLE_OF:,} (padding to a GPU tile or a "
                "tensor-parallel degree needs far less, and every padding row is written)"
            )
        return value


# --------------------------------------------------------------------------- the configuration


def normalize_dtype(value: Any) -> str | None:
    """``"torch.bfloat16"``, ``"bf16"``... -> ``"bfloat16"``; ValueError listing valid names otherwise."""
    if value is None:
        return None
    name = str(value).strip().lower() if isinstance(value, str) else None
    if name is not None and name.startswith("torch."):
        name = name[len("torch.") :]
    if name in DTYPE_ALIASES:
        return DTYPE_ALIASES[name]
    raise ValueError(f"unsupported dtype {value!r}; valid values: {', '.join(VALID_DTYPES)} (also bf16, fp16, fp32)")


def _dtype(value: Any) -> str | None:
    try:
        return normalize_dtype(value)
    except ValueError as exc:
        raise fail(str(exc)) from None


DType = Annotated[Any, PlainValidator(_dtype)]


class LocatedConfig(BaseModel):
    """A config that remembers the YAML it was loaded from (text, file name, the line of every
    key), so that an error found after loading still points at the line to fix. The base of
    every config kind; ``ConfigKind`` loads them."""

    _source_text: str | None = PrivateAttr(default=None)
    _source_name: str | None = PrivateAttr(default=None)
    _lines: dict = PrivateAttr(default_factory=dict)
    _ignored: tuple = PrivateAttr(default=())

    @property
    def ignored_keys(self) -> tuple[ConfigError, ...]:
        """The keys the loaded YAML held that no merge reads, dropped while loading: one
        ConfigError each (key path, line, did-you-mean), to warn about or, strictly, raise."""
        return self._ignored

    @property
    def source_text(self) -> str | None:
        """The YAML text this config was loaded from (None when built in Python)."""
        return self._source_text

    @property
    def source_name(self) -> str | None:
        return self._source_name

    def line_of(self, path: str | tuple) -> int | None:
        """The YAML line of a key path (``("slices", 0, "sources")`` or ``"slices[0].sources"``)."""
        if isinstance(path, str):
            path = _parse_key_path(path)
        return line_of(self._lines, tuple(path)) if self._lines else None

    def error(self, message: str, key: str | tuple | None = None) -> ConfigError:
        """A ConfigError about this config, located at ``key`` (a dotted path or a tuple)."""
        line = self.line_of(key) if key else None  # from the tuple: a module name may hold dots
        if isinstance(key, tuple):
            key = format_path(key)
        return ConfigError(message, key=key, line=line, source=self._source_name)


class MergeConfiguration(LocatedConfig):
    """A merge config. Give exactly one of ``slices``, ``models`` and ``modules``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    merge_method: str
    slices: list[OutputSliceDefinition] | None = None
    models: list[InputModelDefinition] | None = None
    modules: dict[str, OutputModuleDefinition] | None = None
    parameters: Parameters | None = None
    base_model: ModelReference | None = None
    dtype: DType = None
    out_dtype: DType = None
    tokenizer_source: Annotated[Any, PlainValidator(lambda v: None if v is None else _tokenizer_source(v))] = None
    """``"union" | "base" | ModelReference | None`` (None: see effective_tokenizer_source)."""
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    random_seed: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in IGNORED_TOP_LEVEL_KEYS):
            data = {k: v for k, v in data.items() if k not in IGNORED_TOP_LEVEL_KEYS}
        return data

    @field_validator("merge_method", mode="after")
    @classmethod
    def _method_name(cls, value: str) -> str:
        if not value.strip():
            raise fail("merge_method is empty")
        return value.strip()

    @field_validator("random_seed", mode="after")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**64:
            raise fail(f"random_seed must be between 0 and 2**64-1, got {value}")
        return value

    @field_validator("modules", mode="after")
    @classmethod
    def _module_names(cls, value: dict[str, OutputModuleDefinition] | None) -> Any:
        if value is not None and not value:
            raise fail("'modules' is empty; give at least one module (e.g. 'default') with its slices or models")
        for name in value or ():
            if not name.strip():
                raise fail("a module name must not be empty", (name,))
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> MergeConfiguration:
        if self.modules is not None and (self.slices is not None or self.models is not None):
            other = "slices" if self.slices is not None else "models"
            raise fail(
                f"give either 'modules' or '{other}', not both (a module holds its own '{other}')", key="modules"
            )
        if self.slices is not None and self.models is not None:
            raise fail("give either 'slices' or 'models', not both", key="models")
        if self.slices is None and self.models is None and self.modules is None:
            raise fail(
                "the config needs 'models' (whole models to merge) or 'slices' (layer ranges to merge), "
                "or 'modules' (slices or models per module)"
            )
        if self.slices is not None and not self.slices:
            raise fail("'slices' is empty; list at least one output slice", key="slices")
        for i, sl in enumerate(self.slices or ()):
            for j, src in enumerate(sl.sources):
                if src.layer_range == (0, 0):  # only a module without layers takes it
                    raise fail(bad_layer_range(0, 0), ("slices", i, "sources", j, "layer_range"))
        if self.models is not None and not self.models:
            raise fail("'models' is empty; list at least one model", key="models")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise fail(
                "give either 'tokenizer' or 'tokenizer_source', not both (tokenizer.source replaces tokenizer_source)",
                key="tokenizer_source",
            )
        return self

    def __eq__(self, other: object) -> bool:
        """Equal when every field is equal (where the config was loaded from does not count)."""
        if not isinstance(other, MergeConfiguration):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # lists and dicts inside: not hashable

    # ------------------------------------------------------------------ accessors

    def referenced_models(self) -> list[ModelReference]:
        """Every model whose weights the merge reads: the base first (if set), then in config
        order, each once. Slice-level ``base_model`` overrides are included after their slice's sources."""
        out: list[ModelReference] = []

        def add(ref: ModelReference | None) -> None:
            if ref is not None and ref not in out:
                out.append(ref)

        add(self.base_model)
        groups = [(self.models, self.slices)] + [(m.models, m.slices) for m in (self.modules or {}).values()]
        for models, slices in groups:
            for m in models or ():
                add(m.model)
            for s in slices or ():
                for src in s.sources:
                    add(src.model)
                add(s.base_model)
        return out

    def model_key(self, ref: ModelReference) -> tuple | None:
        """The first config key that names ``ref`` (for locating errors about that model)."""
        if self.base_model == ref:
            return ("base_model",)
        groups: list[tuple[tuple, Any]] = [((), self)]
        groups += [(("modules", name), m) for name, m in (self.modules or {}).items()]
        for at, group in groups:
            for i, m in enumerate(group.models or ()):
                if m.model == ref:
                    return (*at, "models", i, "model")
            for si, s in enumerate(group.slices or ()):
                for j, src in enumerate(s.sources):
                    if src.model == ref:
                        return (*at, "slices", si, "sources", j, "model")
                if s.base_model == ref:
                    return (*at, "slices", si, "base_model")
        return None

    def to_yaml(self) -> str:
        """The config as YAML (unset keys left out; numeric lists in flow style). Loads back equal."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True).rstrip() + "\n"


class _ConfigDumper(yaml.SafeDumper):
    def represent_list(self, data: list) -> yaml.SequenceNode:
        flow = all(_is_number(e) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def effective_tokenizer_source(config: MergeConfiguration) -> Any:
    """Where the output vocabulary comes from: ``"base"``, ``"union"`` or a ModelReference.

    ``tokenizer.source`` if a ``tokenizer`` block is given (default "union"), else
    ``tokenizer_source``, else "base".
    """
    if config.tokenizer is not None:
        return config.tokenizer.source
    if config.tokenizer_source is not None:
        return config.tokenizer_source
    return "base"


# --------------------------------------------------------------------------- error translation


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found at ``loc`` below ``root`` (None if not a model)."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if inspect.isclass(tp) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif origin in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if inspect.isclass(tp) and issubclass(tp, BaseModel) else None


def _translate_errors(exc: ValidationError, root: type[BaseModel]) -> list[tuple[tuple, str]]:
    """Each pydantic error as (key path, message a user can act on)."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        kind = err["type"]
        msg = err["msg"]
        if kind == "mergekitty":
            msg = ctx["message"]
            loc = (*loc, *ctx.get("_mk_subpath", ()))
            if "_mk_key" in ctx:
                loc = (*loc, ctx["_mk_key"])
        elif kind == "extra_forbidden":
            key = loc[-1]
            parent = _model_at(root, loc[:-1])
            if parent is MergeConfiguration and key in UNSUPPORTED_KEYS:
                msg = UNSUPPORTED_KEYS[key]
            else:
                allowed = list(parent.model_fields) if parent is not None else []
                msg = f"unknown key '{key}'{suggest(key, allowed)}"
                if allowed and "did you mean" not in msg:
                    msg += f" (allowed here: {', '.join(allowed)})"
        elif "[key]" in loc:  # a mapping key of the wrong type, e.g. an unquoted number
            loc = loc[: loc.index("[key]")]
            msg = f"the key {loc[-1]!r} must be a string; put it in quotes"
        elif kind == "missing":
            msg = f"missing required key '{loc[-1]}'"
        else:
            msg = msg.removeprefix("Value error, ")
            if "input" in err and kind != "value_error":
                msg += f" (got {describe(err['input'])})"
        out.append((loc, msg))
    # "missing 'merge_method'" next to "unknown key 'merge_methd'; did you mean 'merge_method'?"
    # says the same thing twice: keep only the typo.
    suggested = set()
    for loc, msg in out:
        if msg.startswith("unknown key") and "did you mean '" in msg:
            suggested.add((*loc[:-1], msg.split("did you mean '")[1].split("'")[0]))
    return [(loc, msg) for loc, msg in out if not (msg.startswith("missing required key") and loc in suggested)]


def _without(data: Any, loc: tuple) -> Any:
    """A copy of ``data`` without the key at ``loc`` (the containers on the way copied)."""
    head, *rest = loc
    if isinstance(data, dict):
        if not rest:
            return {k: v for k, v in data.items() if k != head}
        return {**data, head: _without(data[head], tuple(rest))}
    if isinstance(data, list) and isinstance(head, int) and rest:
        return [_without(v, tuple(rest)) if i == head else v for i, v in enumerate(data)]
    return data


def report_ignored(config: LocatedConfig, strict: bool = False, also: typing.Iterable[ConfigError] = ()) -> None:
    """Warn once about each key ``config`` held that no merge reads (and each of ``also``, such
    as parameters the method does not read), in line order; with ``strict``, raise the first as
    the ConfigError it is."""
    problems = sorted([*config.ignored_keys, *also], key=lambda p: (p.line is None, p.line or 0))
    for problem in problems:
        if strict:
            detail = problem.detail.replace(f"; it {_IGNORED_AS}", "").replace(f" and {_IGNORED_AS}", "")
            raise ConfigError(
                detail + " (strict mode: ignored keys are errors)", problem.key, problem.line, problem.source
            )
        log.warning("%s", problem)


def _parse_key_path(key: str) -> tuple:
    parts: list[Any] = []
    for chunk in key.replace("]", "").split("."):
        name, *indices = chunk.split("[")
        if name:
            parts.append(name)
        parts.extend(int(i) for i in indices if i.isdigit())
    return tuple(parts)


# --------------------------------------------------------------------------- loading


def _too_large(source: str, limit: int = MAX_CONFIG_BYTES) -> ConfigError:
    return ConfigError(f"the config is larger than {limit // 2**20} MiB; is it a YAML config?", source=source)


class ConfigKind:
    """The located YAML loader of one config schema (a ``LocatedConfig``): every problem is a
    ConfigError naming the key path and its line."""

    def __init__(self, schema: type[LocatedConfig], name: str, mapping: str, accepts_dict: bool = False):
        self.schema = schema
        self.name = name  # "a MergeConfiguration", for errors
        self.mapping = mapping  # what the top level must be, for errors
        self.accepts_dict = accepts_dict  # whether ``coerce`` takes parsed data

    def from_data(self, data: Any, source: str = "<config>", lines: dict | None = None, text: str | None = None):
        """Validate already-parsed YAML data (a dict). Raises ConfigError."""
        lines = lines or {}
        if not isinstance(data, dict):
            what = "empty" if data is None else f"a {type(data).__name__}, not a mapping"
            raise ConfigError(f"{self.mapping}; this one is {what}", line=lines.get(()), source=source)
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(f"keys must be strings, got {key!r}", line=lines.get((key,)), source=source)
        ignored: list[ConfigError] = []
        first: ValidationError | None = None
        while True:
            try:
                config = self.schema.model_validate(data)
                break
            except ValidationError as exc:
                first = first or exc
                unknown = self._unknown_keys(exc)
                if not unknown:
                    # every problem as first found: an unknown key next to a missing one is
                    # likely its typo, and says so
                    self._raise_validation(first, lines, source)
                for loc, hint in unknown:
                    data = _without(data, loc)
                    ignored.append(
                        ConfigError(
                            f"'{loc[-1]}' is not a config key here and {_IGNORED_AS}{hint}",
                            key=format_path(loc),
                            line=line_of(lines, loc),
                            source=source,
                        )
                    )
        config._source_text = text
        config._source_name = source
        config._lines = dict(lines)
        config._ignored = tuple(ignored)
        return config

    def _unknown_keys(self, exc: ValidationError) -> list[tuple[tuple, str]]:
        """(key path, did-you-mean) of each key the schema does not have, other than the keys
        of other tools' features this version refuses (UNSUPPORTED_KEYS)."""
        out = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            ctx = err.get("ctx") or {}
            if "_mk_unknown" in ctx:  # found by a validator of ours (a conditional parameter's keys)
                out.append(((*loc, *ctx.get("_mk_subpath", ())), ctx["_mk_unknown"]))
                continue
            if err["type"] != "extra_forbidden" or not loc:
                continue
            parent = _model_at(self.schema, loc[:-1])
            if parent is MergeConfiguration and loc[-1] in UNSUPPORTED_KEYS:
                continue
            fields = list(parent.model_fields) if parent is not None else []
            hint = suggest(loc[-1], fields) or (f" (keys here: {', '.join(fields)})" if fields else "")
            out.append((loc, hint))
        return out

    def _raise_validation(self, exc: ValidationError, lines: dict, source: str) -> typing.NoReturn:
        problems = [(loc, msg, line_of(lines, loc)) for loc, msg in _translate_errors(exc, self.schema)]
        problems.sort(key=lambda p: (p[2] is None, p[2] or 0))
        loc, msg, line = problems[0]
        if len(problems) > 1:
            extra = [
                f"  {format_path(loc) or '(top level)'}" + (f" (line {n})" if n else "") + f": {m}"
                for loc, m, n in problems[1:]
            ]
            msg += f"\n{len(problems) - 1} more problem(s):\n" + "\n".join(extra)
        raise ConfigError(msg, key=format_path(loc) or None, line=line, source=source) from None

    def load(self, text: str, source: str = "<config>"):
        """Parse and validate YAML text. Raises ConfigError with the key path and line."""
        if not isinstance(text, str):
            raise ConfigError(f"expected YAML text, got {type(text).__name__}", source=source)
        if len(text) > MAX_CONFIG_BYTES:
            raise _too_large(source)
        try:
            data, lines = load_with_lines(text)
        except YamlSyntaxError as exc:
            raise ConfigError(str(exc), line=exc.line, source=source) from None
        except DuplicateKeyError as exc:
            raise ConfigError(
                f"{exc} (it is given more than once)", key=format_path(exc.path), line=exc.line, source=source
            ) from None
        return self.from_data(data, source=source, lines=lines, text=text)

    def load_file(self, path: str | os.PathLike):
        """Read and validate a YAML config file. Raises ConfigError (also for a missing file)."""
        return self.load(read_config_file(path), source=str(path))

    def coerce(self, config: Any):
        """``config`` as a validated config: one already, YAML text, a .yml/.yaml file path,
        or (where accepted) parsed data."""
        if isinstance(config, self.schema):
            return config
        if (
            isinstance(config, (str, os.PathLike))
            and "\n" not in str(config)
            and Path(config).suffix in (".yml", ".yaml")
        ):
            return self.load_file(config)
        if isinstance(config, str):
            return self.load(config)
        if self.accepts_dict and isinstance(config, dict):
            return self.from_data(config)
        accepted = "YAML text, a dict" if self.accepts_dict else "YAML text"
        raise ConfigError(f"expected {self.name}, {accepted} or a YAML file path, got {type(config).__name__}")


def read_config_file(path: str | os.PathLike, limit: int = MAX_CONFIG_BYTES) -> str:
    """The text of a YAML file of at most ``limit`` bytes, newlines normalised; ConfigError for
    a missing or unreadable file, one too large, or bytes that are not UTF-8 (with the line)."""
    from .io.model_files import undecodable_at

    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise _too_large(str(path), limit)
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as exc:
        line, column, byte = undecodable_at(exc)
        raise ConfigError(
            f"the config is not UTF-8 text: byte 0x{byte:02x} cannot be decoded (column {column})",
            line=line,
            source=str(path),
        ) from None


MERGE_CONFIG = ConfigKind(
    MergeConfiguration,
    "a MergeConfiguration",
    "the config must be a YAML mapping of keys (merge_method, models...)",
    accepts_dict=True,
)
config_from_data = MERGE_CONFIG.from_data
load_config = MERGE_CONFIG.load
load_config_file = MERGE_CONFIG.load_file


# --------------------------------------------------------------------------- checks against the method registry


def check_method(config: MergeConfiguration):
    """The registered MergeMethod named by ``config.merge_method``; ConfigError with a
    did-you-mean suggestion if there is none."""
    from .methods.registry import get_method, method_names

    name = config.merge_method
    try:
        return get_method(name)
    except KeyError:
        pass
    names = method_names()
    hint = suggest(name, names) or suggest(name.lower(), names)
    raise config.error(f"unknown merge method '{name}'{hint} (available: {', '.join(names)})", key="merge_method")


def parameter_blocks(config: MergeConfiguration):
    """(key path, parameters dict) for every parameters block, in config order."""
    if config.parameters:
        yield ("parameters",), config.parameters
    groups: list[tuple[tuple, Any]] = [((), config)]
    groups += [(("modules", name), m) for name, m in (config.modules or {}).items()]
    for at, group in groups:
        if at and group.parameters:
            yield (*at, "parameters"), group.parameters
        for i, m in enumerate(group.models or ()):
            if m.parameters:
                yield (*at, "models", i, "parameters"), m.parameters
        for i, s in enumerate(group.slices or ()):
            if s.parameters:
                yield (*at, "slices", i, "parameters"), s.parameters
            for j, src in enumerate(s.sources):
                if src.parameters:
                    yield (*at, "slices", i, "sources", j, "parameters"), src.parameters


def parameter_name_problems(config: MergeConfiguration, method) -> list[ConfigError]:
    """A ConfigError (not raised) for each parameter name ``method`` does not read, with a
    did-you-mean suggestion: the other tools ignore such a parameter, so the caller warns
    (report_ignored) or, strictly, fails."""
    known = [spec.name for spec in (*method.global_params, *method.model_params)]
    problems = []
    for path, params in parameter_blocks(config):
        for name in params:
            if name not in known:
                hint = suggest(name, known)
                accepted = f" (it reads: {', '.join(known)})" if known else " (it takes no parameters)"
                problems.append(
                    config.error(
                        f"merge method '{method.name}' does not use parameter '{name}'; it {_IGNORED_AS}"
                        + (hint or accepted),
                        key=(*path, name),
                    )
                )
    return problems
