"""What every output architecture shares, and choosing one for a set of inputs.

An output architecture says whether it can hold the inputs (``reasons``: empty when it
can, else one line per obstacle), builds the transformers config of the output, and
names the output tensors exactly as ``save_pretrained`` of that class writes them in
transformers 5 (one tensor per expert and projection, not the fused in-memory layout).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ArchitectureError

log = logging.getLogger(__name__)

# Settings carried from the base model's config into the output config, when the output
# config class takes them.
COMMON_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_dropout",
)  # fmt: skip


class OutputArchitecture:
    name: str = ""
    hf_class: str = ""
    config_class: str = ""
    takes_model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------------ fitting

    def reasons(self, inputs, config) -> list[str]:
        """Why this architecture cannot hold the inputs (empty when it can)."""
        out = []
        types = inputs.model_types()
        odd = sorted({f"{label} is {t}" for label, t in types.items() if t not in self.takes_model_types})
        if odd:
            out.append(f"takes {' / '.join(self.takes_model_types)} models only ({'; '.join(odd)})")
        sizes = {e.intermediate_size for e in inputs.experts}
        if len(sizes) > 1 or -1 in sizes:
            shown = ", ".join(
                f"{e.key[0]}[{e.key[1]}]: {e.intermediate_size if e.intermediate_size > 0 else 'varies by layer'}"
                for e in inputs.experts
            )
            out.append(f"all routed experts must have one MLP size, but their intermediate sizes differ ({shown})")
        extras = inputs.base_mlp_extras()
        if extras:
            out.append(f"the base MLP has tensors the experts cannot hold: {', '.join(extras)}")
        return out + self.extra_reasons(inputs, config)

    def extra_reasons(self, inputs, config) -> list[str]:
        return []

    # ------------------------------------------------------------------ output config

    def base_settings(self, inputs, trust_remote_code: bool = False) -> dict[str, Any]:
        import transformers

        base = transformers.AutoConfig.from_pretrained(str(inputs.base.path), trust_remote_code=trust_remote_code)
        text = base.get_text_config() if hasattr(base, "get_text_config") else base
        data = text.to_dict()
        out = {k: data[k] for k in COMMON_KEYS if k in data and data[k] is not None}
        if "head_dim" not in out:
            out["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        return out

    def build_config(self, inputs, config, dtype: str, trust_remote_code: bool = False):
        """The transformers config object of the output model."""
        import transformers

        cls = getattr(transformers, self.config_class)
        kwargs = {**self.base_settings(inputs, trust_remote_code), **self.moe_settings(inputs, config)}
        out = cls(**kwargs)
        out.architectures = [self.hf_class]
        out.dtype = dtype
        return out

    def moe_settings(self, inputs, config) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ tensor names

    def router_name(self, prefix: str, layer: int) -> str:
        return f"{prefix}.{layer}.mlp.gate.weight"

    def expert_name(self, prefix: str, layer: int, expert: int, part: str) -> str:
        return f"{prefix}.{layer}.mlp.experts.{expert}.{part}.weight"

    def shared_name(self, prefix: str, layer: int, shared: int, part: str) -> str:
        raise NotImplementedError

    def shared_gate_name(self, prefix: str, layer: int) -> str | None:
        return None


def architectures() -> list[OutputArchitecture]:
    from .deepseek import DeepSeekMoE
    from .mixtral import Mixtral
    from .qwen2_moe import Qwen2Moe
    from .qwen3_moe import Qwen3Moe

    return [Mixtral(), Qwen2Moe(), Qwen3Moe(), DeepSeekMoE()]


def select_architecture(inputs, config) -> OutputArchitecture:
    """The output architecture for ``inputs``: among those ``config.architecture`` names (a
    prefix) and that can hold them, Mixtral if it is one, else the first. ArchitectureError
    with each candidate's reasons when none can."""
    candidates = [a for a in architectures() if config.architecture is None or a.name.startswith(config.architecture)]
    fitting, rejected = [], []
    for arch in candidates:
        why = arch.reasons(inputs, config)
        (rejected if why else fitting).append((arch, why))
    if not fitting:
        asked = f" (architecture: {config.architecture})" if config.architecture else ""
        detail = "; ".join(f"{a.name}: {', '.join(why)}" for a, why in rejected)
        raise ArchitectureError(f"no output architecture can hold these models{asked}: {detail}")
    for arch, _ in fitting:
        if arch.name == "mixtral":
            return arch
    if len(fitting) > 1:
        log.warning(
            "several output architectures fit (%s); using %s (choose with 'architecture:')",
            ", ".join(a.name for a, _ in fitting),
            fitting[0][0].name,
        )
    return fitting[0][0]


def sliding_window_of(base_config: dict) -> int | None:
    """The attention window of a dense base config, or None when every layer attends fully."""
    mt = base_config.get("model_type")
    window = base_config.get("sliding_window")
    if mt == "mistral":
        return window or None
    if base_config.get("use_sliding_window"):
        return window or None
    return None


def qwen_moe_settings(inputs, config) -> dict[str, Any]:
    """The expert settings Qwen2-MoE and Qwen3-MoE configs share: every layer sparse, one
    MLP size for every expert, top-k weights renormalized."""
    size = inputs.experts[0].intermediate_size
    return {
        "intermediate_size": inputs.base.config.get("intermediate_size", size),
        "moe_intermediate_size": size,
        "num_experts": len(inputs.experts),
        "num_experts_per_tok": config.experts_per_token,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }
