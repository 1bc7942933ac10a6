"""DeepSeek-MoE output: not buildable with the model classes of transformers 5.

The DeepSeek MoE classes that transformers ships (``DeepseekV2ForCausalLM``,
``DeepseekV3ForCausalLM``) use multi-head latent attention (a shared low-rank key/value
projection with a separate rotary part), which the per-head q/k/v/o weights of llama,
mistral or qwen models cannot be turned into; the original DeepSeek-MoE class with
llama-style attention exists only as remote code. This candidate is kept so that asking
for ``architecture: deepseek`` explains why, and points at the alternative.
"""

from __future__ import annotations

from .arch import OutputArchitecture


class DeepSeekMoE(OutputArchitecture):
    name = "deepseek"
    hf_class = "DeepseekV3ForCausalLM"
    config_class = "DeepseekV3Config"
    takes_model_types = ("llama", "mistral", "qwen2")

    def reasons(self, inputs, config) -> list[str]:
        return [
            "transformers 5 has DeepSeek MoE classes only with multi-head latent attention (DeepseekV2/V3), "
            "which llama-style q/k/v/o attention weights cannot be converted to; use qwen2_moe for a shared expert"
        ]
