"""Mixtral output (``MixtralForCausalLM``): llama or mistral inputs, no shared experts.

On disk (what transformers 5 ``save_pretrained`` writes for this class) each expert is
``model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight`` (w1 = gate_proj,
w2 = down_proj, w3 = up_proj) and the router is ``model.layers.L.block_sparse_moe.gate.weight``.
"""

from __future__ import annotations

from .arch import OutputArchitecture, sliding_window_of

_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class Mixtral(OutputArchitecture):
    name = "mixtral"
    hf_class = "MixtralForCausalLM"
    config_class = "MixtralConfig"
    takes_model_types = ("llama", "mistral")

    def extra_reasons(self, inputs, config) -> list[str]:
        out = []
        if config.shared_experts:
            out.append("has no shared experts (use qwen2_moe for one)")
        biases = inputs.attention_biases()
        if biases:
            out.append(f"its attention has no biases, but the base has {', '.join(biases)}")
        return out

    def moe_settings(self, inputs, config) -> dict:
        if len(inputs.experts) & (len(inputs.experts) - 1):
            import logging

            logging.getLogger(__name__).warning(
                "%d experts: llama.cpp and some other runtimes expect a power of two", len(inputs.experts)
            )
        return {
            "intermediate_size": inputs.experts[0].intermediate_size,
            "num_local_experts": len(inputs.experts),
            "num_experts_per_tok": config.experts_per_token,
            "sliding_window": sliding_window_of(inputs.base.config),
        }

    def router_name(self, prefix: str, layer: int) -> str:
        return f"{prefix}.{layer}.block_sparse_moe.gate.weight"

    def expert_name(self, prefix: str, layer: int, expert: int, part: str) -> str:
        return f"{prefix}.{layer}.block_sparse_moe.experts.{expert}.{_W[part]}.weight"
