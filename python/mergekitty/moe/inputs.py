"""The input models of an MoE build, opened from their headers only, and the facts about
them that decide which output architecture can hold them.

Every model is a ``Checkpoint`` (mmapped, zero-copy) with an inferred ``ModelLayout``;
nothing here reads a weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArchitectureError
from ..text import listing
from ..yaml_lines import error_at_key

log = logging.getLogger(__name__)

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
# tensors some checkpoints carry that are recomputed by transformers, never loaded
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class SourceModel:
    ref: Any
    label: str
    path: Path
    checkpoint: Any  # io.checkpoint.Checkpoint
    config: dict
    layout: Any  # architecture.layout.ModelLayout

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "?")

    def mlp_name(self, layer: int, part: str) -> str:
        return self.layout.layer_name(layer, f"mlp.{part}.weight")

    def mlp_shapes(self, layer: int) -> tuple:
        return tuple(self.checkpoint.infos[self.mlp_name(layer, p)].shape for p in MLP_PARTS)


@dataclass
class ExpertInput:
    key: tuple  # ("experts", i) or ("shared_experts", i): where it is in the config
    spec: Any  # config.Expert
    model: SourceModel
    intermediate_size: int = 0

    @property
    def where(self) -> str:
        return f"{self.key[0]}[{self.key[1]}] ({self.model.label})"


@dataclass
class MoEInputs:
    base: SourceModel
    experts: list[ExpertInput]
    shared: list[ExpertInput]
    models: list[SourceModel] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.base.layout.num_layers

    @property
    def hidden_size(self) -> int:
        return int(self.base.checkpoint.infos[self.base.mlp_name(0, "down_proj")].shape[0])

    def model_types(self) -> dict[str, str]:
        return {m.label: m.model_type for m in self.models}

    def base_layer_suffixes(self) -> list[str]:
        """The tensors of a base layer that the output copies (everything but the dense MLP)."""
        return [
            s
            for s in self.base.layout.layer_tensors[0]
            if not s.startswith("mlp.") and not s.endswith(DROPPED_SUFFIXES)
        ]

    def base_mlp_extras(self) -> list[str]:
        """Tensors under ``mlp.`` other than the three projection weights (biases...)."""
        return [
            s
            for s in self.base.layout.layer_tensors[0]
            if s.startswith("mlp.") and s not in {f"mlp.{p}.weight" for p in MLP_PARTS}
        ]

    def attention_biases(self) -> list[str]:
        return [s for s in self.base_layer_suffixes() if s.endswith(".bias")]

    def uses_tied_embeddings(self) -> bool:
        return not any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in self.base.checkpoint.names())


def open_model(ref, options) -> SourceModel:
    from ..architecture import infer_layout, model_layout_override
    from ..io.checkpoint import Checkpoint
    from ..refs import resolve_local_path

    path = resolve_local_path(ref.path, ref.revision, options.transformers_cache)
    checkpoint = Checkpoint(Path(path), label=str(ref))
    if getattr(ref, "lora", None) is not None:
        # model+lora: the adapter is applied tensor by tensor as the tensors are copied
        from ..lora.apply import open_lora_checkpoint

        adapter = resolve_local_path(ref.lora.path, ref.lora.revision, options.transformers_cache)
        checkpoint = open_lora_checkpoint(checkpoint, Path(adapter), label=str(ref))
        other_base = checkpoint.adapter.other_base_warning(ref.path, path)
        if other_base:
            log.warning("%s", other_base)
    cfg = checkpoint.config()
    stated = model_layout_override(path)
    layout = infer_layout(checkpoint.names(), cfg, where=str(ref), override=stated)
    return SourceModel(ref, str(ref), Path(path), checkpoint, cfg, layout)


def open_inputs(config, options) -> MoEInputs:
    """Open every model of ``config`` and check what every output architecture needs alike:
    the same layer count and hidden size everywhere, and dense MLP weights in every layer."""
    from ..errors import MergekittyError

    opened: dict[str, SourceModel] = {}
    refs = [(("base_model",), config.base_model)] + [
        ((*key, "source_model"), e.source_model) for key, e in config.all_experts()
    ]
    for key, ref in refs:
        if str(ref) in opened:
            continue
        try:
            opened[str(ref)] = open_model(ref, options)
        except MergekittyError as exc:
            raise error_at_key(exc, config, key) from None
    base = opened[str(config.base_model)]
    if base.layout.num_layers == 0:
        raise ArchitectureError(f"base model {base.label}: no layer stack found in its tensor names")

    def expert(key, spec) -> ExpertInput:
        m = opened[str(spec.source_model)]
        where = f"{key[0]}[{key[1]}] ({m.label})"
        if m.layout.num_layers != base.layout.num_layers:
            raise ArchitectureError(
                f"{where} has {m.layout.num_layers} layers but the base model {base.label} has {base.layout.num_layers}"
            )
        sizes = set()
        for layer in range(m.layout.num_layers):
            for part in MLP_PARTS:
                name = m.mlp_name(layer, part)
                if name not in m.checkpoint:
                    raise ArchitectureError(
                        f"{where}: no tensor '{name}' in {m.path}; experts are taken from dense models with "
                        "mlp.gate_proj / mlp.up_proj / mlp.down_proj weights"
                    )
            gate, up, down = m.mlp_shapes(layer)
            if gate != up or len(gate) != 2 or down != (gate[1], gate[0]):
                raise ArchitectureError(
                    f"{where}: layer {layer} MLP shapes do not fit together (gate {gate}, up {up}, down {down})"
                )
            sizes.add(gate)
        hidden = {s[1] for s in sizes}
        base_hidden = (
            int(base.checkpoint.infos[base.mlp_name(0, "down_proj")].shape[0])
            if base.mlp_name(0, "down_proj") in base.checkpoint
            else None
        )
        if base_hidden is not None and hidden != {base_hidden}:
            raise ArchitectureError(
                f"{where} has hidden size {listing(sorted(hidden))} but the base model {base.label} has {base_hidden}"
            )
        inter = sorted({s[0] for s in sizes})
        return ExpertInput(key, spec, m, inter[0] if len(inter) == 1 else -1)

    for part in MLP_PARTS:
        if base.mlp_name(0, part) not in base.checkpoint:
            raise ArchitectureError(
                f"base model {base.label}: no tensor '{base.mlp_name(0, part)}'; the base must be a dense model with llama-style MLPs"
            )
    experts = [expert(("experts", i), e) for i, e in enumerate(config.experts)]
    shared = [expert(("shared_experts", i), e) for i, e in enumerate(config.shared_experts or ())]
    return MoEInputs(base, experts, shared, list(opened.values()))
