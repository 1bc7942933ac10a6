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
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, field_validator, model_validator

from ..config import ConfigKind, DType, LocatedConfig, describe, fail, model_ref, suggest
from ..refs import ModelReference

__all__ = [
    "GATE_MODES",
    "PROMPT_GATE_MODES",
    "RANDOM_GATE_MODES",
    "ARCHITECTURE_NAMES",
    "Expert",
    "MoEConfig",
    "MOE_CONFIG",
    "moe_config_from_data",
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
        raise fail('prompts must be a list of strings; put the prompt in a list: ["..."]')
    if not isinstance(value, list):
        raise fail(f"prompts must be a list of strings, got {describe(value)}")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise fail(f"a prompt must be a string, got {describe(p)}", (i,))
    # empty prompts are allowed (published configs have them); the gate builder warns about what they add
    return list(value)


def _finite(value: Any, what: str, positive: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"{what} must be a number, got {describe(value)}")
    if not math.isfinite(value) or (positive and value < 0):
        raise fail(f"{what} must be a finite number{' >= 0' if positive else ''}, got {value!r}")
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
        return model_ref(value)

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


class MoEConfig(LocatedConfig):
    """A mixture-of-experts build: a base model plus one dense model per expert."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: ModelReference
    experts: list[Expert]
    architecture: str | None = None
    gate_mode: str = "hidden"
    dtype: DType = None
    experts_per_token: StrictInt = 2
    shared_experts: list[Expert] | None = None

    @field_validator("base_model", mode="plain")
    @classmethod
    def _base(cls, value: Any) -> ModelReference:
        return model_ref(value)

    @field_validator("gate_mode", mode="plain")
    @classmethod
    def _gate_mode(cls, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in GATE_MODES:
            raise fail(
                f"unknown gate_mode {value!r}{suggest(str(value).lower(), GATE_MODES)} (one of: {', '.join(GATE_MODES)})"
            )
        return value.strip().lower()

    @field_validator("architecture", mode="plain")
    @classmethod
    def _architecture(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(f"architecture must be a name ({', '.join(ARCHITECTURE_NAMES)}), got {describe(value)}")
        low = value.strip().lower()
        if not any(name.startswith(low) for name in ARCHITECTURE_NAMES):
            raise fail(
                f"unknown architecture {value!r}{suggest(low, ARCHITECTURE_NAMES)} (one of: {', '.join(ARCHITECTURE_NAMES)}; a prefix such as 'qwen' selects every match)"
            )
        return low

    @model_validator(mode="after")
    def _cross_checks(self) -> MoEConfig:
        if self.experts_per_token < 1:
            raise fail(f"experts_per_token must be at least 1, got {self.experts_per_token}", key="experts_per_token")
        if not self.experts:
            raise fail("'experts' is empty; list at least one expert", key="experts")
        if len(self.experts) < self.experts_per_token:
            raise fail(
                f"experts_per_token is {self.experts_per_token} but only {len(self.experts)} expert(s) are listed",
                key="experts_per_token",
            )
        if self.gate_mode in PROMPT_GATE_MODES:
            # shared experts need prompts only where the output gives them a gate (output architecture's check)
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise fail(
                        f"gate_mode '{self.gate_mode}' builds each gate from prompts, but this expert has no positive_prompts "
                        "(add some, or use gate_mode random / uniform_random)",
                        ("experts", i),
                    )
            if len(self.experts) > 1:
                prompt_sets = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
                if len(prompt_sets) == 1:
                    raise fail(
                        "every expert has the same prompts, so every gate would be the same; give each expert its own prompts",
                        key="experts",
                    )
        return self

    # ------------------------------------------------------------------ accessors

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


MOE_CONFIG = ConfigKind(
    MoEConfig,
    "an MoEConfig",
    "the MoE config must be a YAML mapping (base_model, experts...)",
    accepts_dict=True,
)
moe_config_from_data = MOE_CONFIG.from_data
load_moe_config = MOE_CONFIG.load
load_moe_config_file = MOE_CONFIG.load_file
