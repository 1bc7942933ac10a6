"""Mixture-of-experts building: dense models become the experts of one MoE model.

    from mergekitty.moe import build_moe
    build_moe("tiny-moe.yml", "out/tiny-moe", random_seed=0)

The base model gives the embeddings, attention, norms and head; each expert's MLP comes
from its source model; the routers come from prompts (hidden states or embeddings of
the base model) or are random. See README "Mixture of experts".
"""

from .build import MoEOptions, MoEResult, build_moe
from .config import GATE_MODES, Expert, MoEConfig, load_moe_config, load_moe_config_file

__all__ = [
    "GATE_MODES",
    "Expert",
    "MoEConfig",
    "MoEOptions",
    "MoEResult",
    "build_moe",
    "load_moe_config",
    "load_moe_config_file",
]
