"""Qwen2-MoE output (``Qwen2MoeForCausalLM``): llama, mistral or qwen2 inputs and exactly
one shared expert, which every token passes through, scaled by its own sigmoid gate.

On disk: ``mlp.experts.E.{gate,up,down}_proj.weight``, router ``mlp.gate.weight``, shared
expert ``mlp.shared_expert.{gate,up,down}_proj.weight`` and its gate
``mlp.shared_expert_gate.weight`` (``[1, hidden]``). Bases without q/k/v biases (llama,
mistral) get ``qkv_bias: false`` rather than zero-filled biases.
"""

from __future__ import annotations

from .arch import OutputArchitecture, qwen_moe_settings, sliding_window_of


class Qwen2Moe(OutputArchitecture):
    name = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"
    config_class = "Qwen2MoeConfig"
    takes_model_types = ("llama", "mistral", "qwen2")

    def extra_reasons(self, inputs, config) -> list[str]:
        out = []
        if len(config.shared_experts or ()) != 1:
            out.append(f"needs exactly one shared expert (shared_experts lists {len(config.shared_experts or ())})")
        from .config import PROMPT_GATE_MODES

        if config.gate_mode in PROMPT_GATE_MODES and any(not e.positive_prompts for e in config.shared_experts or ()):
            out.append(
                f"gives its shared expert a gate, which gate_mode '{config.gate_mode}' builds from prompts, but the shared expert has no positive_prompts"
            )
        for s in inputs.shared:
            if s.intermediate_size <= 0:
                out.append(f"the shared expert's MLP size varies by layer ({s.where})")
        biases = {b.rsplit(".", 2)[-2] for b in inputs.attention_biases()}
        if biases and biases != {"q_proj", "k_proj", "v_proj"}:
            out.append(
                f"its attention has q/k/v biases or none, but the base has biases on {', '.join(sorted(biases))}"
            )
        return out

    def moe_settings(self, inputs, config) -> dict:
        base = inputs.base.config
        out = {
            **qwen_moe_settings(inputs, config),
            "shared_expert_intermediate_size": inputs.shared[0].intermediate_size,
            "qkv_bias": bool(inputs.attention_biases()),
            "use_sliding_window": False,
        }
        window = sliding_window_of(base)
        if window is not None:
            n = inputs.num_layers
            types = base.get("layer_types") if base.get("model_type") == "qwen2" else None
            out.update(
                use_sliding_window=True,
                sliding_window=window,
                max_window_layers=base.get("max_window_layers", 0) if types else 0,
            )
            out["layer_types"] = list(types) if types else ["sliding_attention"] * n
        return out

    def shared_name(self, prefix: str, layer: int, shared: int, part: str) -> str:
        return f"{prefix}.{layer}.mlp.shared_expert.{part}.weight"

    def shared_gate_name(self, prefix: str, layer: int) -> str:
        return f"{prefix}.{layer}.mlp.shared_expert_gate.weight"
