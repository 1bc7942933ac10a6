"""The YAML config of ``mergekitty-moe``: schema, loading, and errors that point at a line.

    base_model: ./base            # embeddings, attention, norms and head come from here
    architecture: mixtral         # optional: mixtral, qwen2_moe (qwen), qwen3_moe (qwen3), deepseek
    gate_mode: hidden             # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
    dtype: bfloat16               # optional; else the base model's dtype
    experts_per_token: 2
    experts:
      - source_model: ./ft1       # this expert's MLP comes from here
        positive_prompts: ["..."]
        negative_prompts: ["..."] # optional
        noise_scale: 0.01         # optional: add N(0, noise_scale^2) noise to the expert's MLP
        residual_scale: 0.5       # optional: multiply the expert's down_proj by this
    shared_experts: [...]         # optional, same schema (Qwen2-MoE: exactly one)

Like the merge config, nothing here imports torch; every problem is a ``ConfigError``
naming the key path and its YAML line, with a did-you-mean for misspelt keys and values.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, StrictInt, ValidationError, field_validator, model_validator

from ..config import DType, _describe, _fail, _model_ref, _suggest, _translate_errors
from ..errors import ConfigError
from ..refs import ModelReference
from ..yaml_lines import DuplicateKeyError, YamlSyntaxError, format_path, line_of, load_with_lines

__all__ = [
    "GATE_MODES",
    "PROMPT_GATE_MODES",
    "RANDOM_GATE_MODES",
    "ARCHITECTURE_NAMES",
    "Expert",
    "MoEConfig",
    "load_moe_config",
    "load_moe_config_file",
]

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_GATE_MODES = ("random", "uniform_random")
PROMPT_GATE_MODES = tuple(m for m in GATE_MODES if m not in RANDOM_GATE_MODES)
# Output architecture names; ``architecture:`` selects those it is a (case-insensitive) prefix of.
ARCHITECTURE_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek")


def _prompts(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        raise _fail('prompts must be a list of strings; put the prompt in a list: ["..."]')
    if not isinstance(value, list):
        raise _fail(f"prompts must be a list of strings, got {_describe(value)}")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise _fail(f"a prompt must be a string, got {_describe(p)}", (i,))
        if not p.strip():
            raise _fail("a prompt is empty", (i,))
    return list(value)


def _finite(value: Any, what: str, positive: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{what} must be a number, got {_describe(value)}")
    if not math.isfinite(value) or (positive and value < 0):
        raise _fail(f"{what} must be a finite number{' >= 0' if positive else ''}, got {value!r}")
    return float(value)


class Expert(BaseModel):
    """One expert: the model whose MLPs it takes, and the prompts its gate is built from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_model: ModelReference
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    @field_validator("source_model", mode="plain")
    @classmethod
    def _ref(cls, value: Any) -> ModelReference:
        return _model_ref(value)

    @field_validator("positive_prompts", "negative_prompts", mode="plain")
    @classmethod
    def _prompt_list(cls, value: Any) -> Any:
        return _prompts(value)

    @field_validator("noise_scale", mode="plain")
    @classmethod
    def _noise(cls, value: Any) -> Any:
        return _finite(value, "noise_scale", positive=True)

    @field_validator("residual_scale", mode="plain")
    @classmethod
    def _residual(cls, value: Any) -> Any:
        return _finite(value, "residual_scale")


class MoEConfig(BaseModel):
    """A mixture-of-experts build: a base model plus one dense model per expert."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: ModelReference
    experts: list[Expert]
    architecture: str | None = None
    gate_mode: str = "hidden"
    dtype: DType = None
    experts_per_token: StrictInt = 2
    shared_experts: list[Expert] | None = None

    _source_text: str | None = PrivateAttr(default=None)
    _source_name: str | None = PrivateAttr(default=None)
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("base_model", mode="plain")
    @classmethod
    def _base(cls, value: Any) -> ModelReference:
        return _model_ref(value)

    @field_validator("gate_mode", mode="plain")
    @classmethod
    def _gate_mode(cls, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in GATE_MODES:
            raise _fail(
                f"unknown gate_mode {value!r}{_suggest(str(value).lower(), GATE_MODES)} (one of: {', '.join(GATE_MODES)})"
            )
        return value.strip().lower()

    @field_validator("architecture", mode="plain")
    @classmethod
    def _architecture(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"architecture must be a name ({', '.join(ARCHITECTURE_NAMES)}), got {_describe(value)}")
        low = value.strip().lower()
        if not any(name.startswith(low) for name in ARCHITECTURE_NAMES):
            raise _fail(
                f"unknown architecture {value!r}{_suggest(low, ARCHITECTURE_NAMES)} (one of: {', '.join(ARCHITECTURE_NAMES)}; a prefix such as 'qwen' selects every match)"
            )
        return low

    @model_validator(mode="after")
    def _cross_checks(self) -> MoEConfig:
        if self.experts_per_token < 1:
            raise _fail(f"experts_per_token must be at least 1, got {self.experts_per_token}", key="experts_per_token")
        if not self.experts:
            raise _fail("'experts' is empty; list at least one expert", key="experts")
        if len(self.experts) < self.experts_per_token:
            raise _fail(
                f"experts_per_token is {self.experts_per_token} but only {len(self.experts)} expert(s) are listed",
                key="experts_per_token",
            )
        if self.gate_mode in PROMPT_GATE_MODES:
            # shared experts need prompts only where the output gives them a gate (output architecture's check)
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise _fail(
                        f"gate_mode '{self.gate_mode}' builds each gate from prompts, but this expert has no positive_prompts "
                        "(add some, or use gate_mode random / uniform_random)",
                        ("experts", i),
                    )
            if len(self.experts) > 1:
                prompt_sets = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
                if len(prompt_sets) == 1:
                    raise _fail(
                        "every expert has the same prompts, so every gate would be the same; give each expert its own prompts",
                        key="experts",
                    )
        return self

    # ------------------------------------------------------------------ accessors

    @property
    def source_text(self) -> str | None:
        return self._source_text

    @property
    def source_name(self) -> str | None:
        return self._source_name

    def line_of(self, path: tuple) -> int | None:
        return line_of(self._lines, tuple(path)) if self._lines else None

    def error(self, message: str, key: str | tuple | None = None) -> ConfigError:
        """A ConfigError about this config, located at ``key`` (a tuple key path or a dotted string)."""
        path = key if isinstance(key, tuple) else tuple(key.split(".")) if key else ()
        return ConfigError(
            message, key=format_path(path) or None, line=self.line_of(path) if path else None, source=self._source_name
        )

    def all_experts(self) -> list[tuple[tuple, Expert]]:
        """(key path, expert) for the routed experts, then the shared ones."""
        out = [(("experts", i), e) for i, e in enumerate(self.experts)]
        out += [(("shared_experts", i), e) for i, e in enumerate(self.shared_experts or ())]
        return out

    def referenced_models(self) -> list[ModelReference]:
        """The base, then every expert source, each once."""
        out: list[ModelReference] = [self.base_model]
        for _, e in self.all_experts():
            if e.source_model not in out:
                out.append(e.source_model)
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)


def _raise_validation(exc: ValidationError, lines: dict, source: str):
    problems = [(loc, msg, line_of(lines, loc)) for loc, msg in _translate_errors(exc, MoEConfig)]
    problems.sort(key=lambda p: (p[2] is None, p[2] or 0))
    loc, msg, line = problems[0]
    if len(problems) > 1:
        extra = [
            f"  {format_path(loc) or '(top level)'}" + (f" (line {n})" if n else "") + f": {m}"
            for loc, m, n in problems[1:]
        ]
        msg += f"\n{len(problems) - 1} more problem(s):\n" + "\n".join(extra)
    raise ConfigError(msg, key=format_path(loc) or None, line=line, source=source) from None


def moe_config_from_data(
    data: Any, source: str = "<config>", lines: dict | None = None, text: str | None = None
) -> MoEConfig:
    lines = lines or {}
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping"
        raise ConfigError(
            f"the MoE config must be a YAML mapping (base_model, experts...); this one is {what}",
            line=lines.get(()),
            source=source,
        )
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", line=lines.get((key,)), source=source)
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc, lines, source)
    config._source_text = text
    config._source_name = source
    config._lines = dict(lines)
    return config


def load_moe_config(text: str, source: str = "<config>") -> MoEConfig:
    """Parse and validate MoE YAML text; ConfigError with the key path and line."""
    if not isinstance(text, str):
        raise ConfigError(f"expected YAML text, got {type(text).__name__}", source=source)
    try:
        data, lines = load_with_lines(text)
    except YamlSyntaxError as exc:
        raise ConfigError(str(exc), line=exc.line, source=source) from None
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{exc} (it is given more than once)", key=format_path(exc.path), line=exc.line, source=source
        ) from None
    return moe_config_from_data(data, source=source, lines=lines, text=text)


def load_moe_config_file(path: str | os.PathLike) -> MoEConfig:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return load_moe_config(text, source=str(path))
