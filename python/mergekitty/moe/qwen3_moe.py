"""Qwen3-MoE output (``Qwen3MoeForCausalLM``): qwen3 inputs (their attention normalizes
q and k per head, which no other family's weights can stand in for), no shared experts.

On disk: ``mlp.experts.E.{gate,up,down}_proj.weight`` and router ``mlp.gate.weight``.
"""

from __future__ import annotations

from .arch import OutputArchitecture, qwen_moe_settings


class Qwen3Moe(OutputArchitecture):
    name = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"
    takes_model_types = ("qwen3",)

    def extra_reasons(self, inputs, config) -> list[str]:
        out = []
        if config.shared_experts:
            out.append("has no shared experts (use qwen2_moe for one)")
        base = inputs.base.config
        types = set(base.get("layer_types") or ())
        if base.get("use_sliding_window") and len(types) > 1:
            out.append(
                "applies one attention window to every layer, but the base mixes sliding and full attention layers"
            )
        return out

    def moe_settings(self, inputs, config) -> dict:
        base = inputs.base.config
        out = {
            **qwen_moe_settings(inputs, config),
            "attention_bias": bool(base.get("attention_bias", False)),
            "use_sliding_window": bool(base.get("use_sliding_window", False)),
        }
        if base.get("sliding_window") is not None:
            out["sliding_window"] = base["sliding_window"]
        return out
