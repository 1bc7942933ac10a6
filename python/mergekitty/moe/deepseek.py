"""DeepSeek-MoE output (``DeepseekForCausalLM``, model_type ``deepseek``): llama or mistral
inputs and at most one shared expert, which has no gate of its own (so no prompts).

transformers has no class for this model: its own DeepSeek classes (V2/V3) use multi-head
latent attention, which llama-style q/k/v/o weights cannot be turned into. The output is
written in the layout of the original release, whose model code is fetched from
``deepseek-ai/deepseek-moe-16b-base`` through ``auto_map`` (load it with
``trust_remote_code=True``). When any other output fits, it is preferred.

On disk: ``mlp.experts.E.{gate,up,down}_proj.weight``, router ``mlp.gate.weight``, shared
expert ``mlp.shared_experts.{gate,up,down}_proj.weight``; attention and norms are llama's.
Every layer is an MoE layer (``first_k_dense_replace = 0``, ``moe_layer_freq = 1``), routing
is a softmax over the router logits, top-k, renormalized (``norm_topk_prob``); the shared
expert's output is added unscaled.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .arch import COMMON_KEYS, OutputArchitecture, sliding_window_of

log = logging.getLogger(__name__)

REMOTE_CODE = "deepseek-ai/deepseek-moe-16b-base"
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_CODE}--configuration_deepseek.DeepseekConfig",
    "AutoModel": f"{REMOTE_CODE}--modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": f"{REMOTE_CODE}--modeling_deepseek.DeepseekForCausalLM",
}


class HandWrittenConfig:
    """A config.json for a model class transformers does not ship: the keys as given."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True)


class DeepSeekMoE(OutputArchitecture):
    name = "deepseek"
    hf_class = "DeepseekForCausalLM"
    config_class = ""  # remote code only
    takes_model_types = ("llama", "mistral")

    def extra_reasons(self, inputs, config) -> list[str]:
        out = []
        shared = config.shared_experts or []
        if len(shared) > 1:
            out.append(f"takes at most one shared expert (shared_experts lists {len(shared)})")
        if any(e.positive_prompts or e.negative_prompts for e in shared):
            out.append("its shared expert has no gate, so it takes no prompts (remove the shared expert's prompts)")
        size = inputs.experts[0].intermediate_size
        for s in inputs.shared:
            if s.intermediate_size != size:
                out.append(
                    f"its shared expert must have the routed experts' MLP size {size}, but {s.where} has {s.intermediate_size}"
                )
        biases = {b.rsplit(".", 2)[-2] for b in inputs.attention_biases()}
        if biases and biases != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            out.append(
                f"its attention has biases on q/k/v/o or none, but the base has biases on {', '.join(sorted(biases))}"
            )
        base = inputs.base.config
        head_dim = base.get("head_dim")
        if head_dim and head_dim * base["num_attention_heads"] != base["hidden_size"]:
            out.append(f"its head size is hidden_size / num_attention_heads, but the base's head_dim is {head_dim}")
        return out

    def build_config(self, inputs, config, dtype: str, trust_remote_code: bool = False) -> HandWrittenConfig:
        base = inputs.base.config
        data = {k: base[k] for k in COMMON_KEYS if base.get(k) is not None and k not in ("head_dim", "rope_parameters")}
        rope = dict(base.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", base.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = base.get("rope_scaling")
        if scaling is None and rope_type != "default":
            scaling = {"type": rope_type, **rope}
        if sliding_window_of(base) is not None:
            log.warning(
                "DeepSeek-MoE attends fully on every layer; the base's sliding window of %d is dropped",
                sliding_window_of(base),
            )
        shared = len(inputs.shared)
        data.update(
            architectures=[self.hf_class],
            model_type="deepseek",
            auto_map=dict(AUTO_MAP),
            intermediate_size=base.get("intermediate_size", inputs.experts[0].intermediate_size),
            moe_intermediate_size=inputs.experts[0].intermediate_size,
            n_routed_experts=len(inputs.experts),
            n_shared_experts=shared or None,
            num_experts_per_tok=config.experts_per_token,
            first_k_dense_replace=0,
            moe_layer_freq=1,
            scoring_func="softmax",
            norm_topk_prob=True,
            aux_loss_alpha=0.001,
            seq_aux=True,
            attention_bias=bool(inputs.attention_biases()),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            pretraining_tp=1,
            tie_word_embeddings=bool(base.get("tie_word_embeddings", False)),
            torch_dtype=dtype,
        )
        data.setdefault("num_key_value_heads", base["num_attention_heads"])
        return HandWrittenConfig(data)

    def shared_name(self, prefix: str, layer: int, shared: int, part: str) -> str:
        return f"{prefix}.{layer}.mlp.shared_experts.{part}.weight"
