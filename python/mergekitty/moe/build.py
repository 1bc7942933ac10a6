"""``build_moe``: open the inputs, pick the output architecture, compute the gates and
stream every tensor into the output directory. ``config.json`` is written last, so a
directory that loads as a model is always complete."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import report_ignored
from ..errors import InvalidArgumentError, OutputError
from ..io.output import MODEL_FILES
from .config import MOE_CONFIG, RANDOM_GATE_MODES, MoEConfig
from .inputs import DROPPED_SUFFIXES, MLP_PARTS, MoEInputs, open_inputs

log = logging.getLogger(__name__)

CONFIG_COPY = "mergekitty_moe_config.yml"
SIDECAR_FILES = ("generation_config.json",)
# an earlier build's config copy goes with its weights
OUTPUT_FILES = (*MODEL_FILES, CONFIG_COPY)


@dataclass(frozen=True)
class MoEOptions:
    device: str = "cpu"  # where the base model runs for hidden-state gates: cpu, cuda, cuda:N or auto
    batch_size: int = 8  # prompts per forward pass
    random_seed: int | None = None  # random gates and expert noise; None draws one (recorded)
    out_shard_size: int = 5 * 10**9  # bytes; <= 0 means one shard
    copy_tokenizer: bool = True
    quiet: bool = False
    trust_remote_code: bool = False
    allow_untrained: bool = False  # --i-understand-this-is-not-useful-without-training
    transformers_cache: str | None = None
    strict: bool = False  # config keys no build reads are errors, not warnings

    def resolved_device(self) -> str:
        from ..extras import resolve_device

        return resolve_device(self.device)


@dataclass
class MoEResult:
    architecture: str  # output architecture name (mixtral, qwen2_moe, qwen3_moe, deepseek)
    hf_class: str
    out_path: Path
    seed: int
    tensors: list = field(default_factory=list)  # writer.OutTensor, in file order
    used_seed: bool = False  # random gates or expert noise drew from the seed


def _output_dtype(config: MoEConfig, inputs: MoEInputs) -> str:
    from ..config import normalize_dtype

    if config.dtype is not None:
        return config.dtype
    raw = inputs.base.config.get("dtype") or inputs.base.config.get("torch_dtype")
    try:
        return normalize_dtype(raw) or "float32"
    except ValueError:
        log.warning(
            "the base model's dtype %r is not one mergekitty writes; writing float32 (set dtype: to choose)", raw
        )
        return "float32"


def _check_experts(config: MoEConfig, inputs: MoEInputs, options: MoEOptions) -> None:
    sources = {str(e.spec.source_model) for e in inputs.experts}
    if len(inputs.experts) > 1 and len(sources) == 1 and not options.allow_untrained:
        raise config.error(
            "every expert comes from the same model, so the experts are identical and the MoE is no better than that model; "
            "pass --i-understand-this-is-not-useful-without-training to build it anyway (e.g. as a start for training)",
            key="experts",
        )
    if config.gate_mode in RANDOM_GATE_MODES and not options.allow_untrained:
        log.warning(
            "gate_mode %s gives routers that know nothing about the experts: the model needs training before it is useful "
            "(--i-understand-this-is-not-useful-without-training silences this)",
            config.gate_mode,
        )


def plan_tensors(config: MoEConfig, inputs: MoEInputs, arch, out_code: str, routed, shared) -> list:
    """Every output tensor, in file order: base weights before the layers, each layer (base
    attention and norms, router, shared gate, experts, shared experts), base weights after."""
    from ..io.tensor_stream import computed, copy_of

    base = inputs.base
    layout = base.layout
    prefix = layout.prefix
    keep = lambda n: not n.endswith(DROPPED_SUFFIXES)  # noqa: E731
    out = [copy_of(n, base, n, out_code) for n in layout.pre if keep(n)]
    suffixes = inputs.base_layer_suffixes()
    for layer in range(inputs.num_layers):
        for s in suffixes:
            name = layout.layer_name(layer, s)
            if name not in base.checkpoint:
                raise OutputError(f"base model {base.label}: layer {layer} has no tensor '{name}' (layer 0 has it)")
            out.append(copy_of(name, base, name, out_code))
        out.append(computed(arch.router_name(prefix, layer), routed[layer], out_code))
        gate_name = arch.shared_gate_name(prefix, layer)
        if gate_name is not None and shared is not None:
            out.append(computed(gate_name, shared[layer, :1], out_code))
        for e, expert in enumerate(inputs.experts):
            out += _expert_tensors(expert, layer, out_code, lambda part, e=e: arch.expert_name(prefix, layer, e, part))
        for s, expert in enumerate(inputs.shared):
            out += _expert_tensors(expert, layer, out_code, lambda part, s=s: arch.shared_name(prefix, layer, s, part))
    out += [copy_of(n, base, n, out_code) for n in layout.post if keep(n)]
    return out


def _expert_tensors(expert, layer: int, out_code: str, name_of: Callable[[str], str]) -> list:
    from ..io.tensor_stream import copy_of

    spec = expert.spec
    out = []
    for part in MLP_PARTS:
        scale = spec.residual_scale if part == "down_proj" and spec.residual_scale is not None else None
        out.append(
            copy_of(
                name_of(part),
                expert.model,
                expert.model.mlp_name(layer, part),
                out_code,
                scale=scale,
                noise=spec.noise_scale,
            )
        )
    return out


def build_moe(config: Any, out_path: str | os.PathLike, options: MoEOptions | None = None, **kwargs: Any) -> MoEResult:
    """Build the mixture of experts ``config`` describes (an MoEConfig, YAML text or a YAML
    file path) and write it to ``out_path``. Keyword arguments override ``options`` fields."""
    import json

    from ..extras import require_torch
    from ..io.dtypes import CONFIG_NAME_TO_CODE
    from ..io.output import OutputTransaction, check_output_path
    from .arch import select_architecture
    from .gates import compute_gates

    options = replace(options or MoEOptions(), **kwargs)
    config = MOE_CONFIG.coerce(config)
    report_ignored(config, options.strict)
    out = Path(out_path).expanduser()
    inputs = open_inputs(config, options)
    check_output_path(out, [(m.path, f"input model {m.label}") for m in inputs.models])
    _check_experts(config, inputs, options)
    if config.gate_mode.startswith("hidden"):
        require_torch("hidden-state MoE gates")  # the base model runs the prompts
    arch = select_architecture(inputs, config)
    log.info("output architecture: %s", arch.hf_class)
    dtype = _output_dtype(config, inputs)
    out_code = CONFIG_NAME_TO_CODE[dtype]
    hf_config = arch.build_config(inputs, config, dtype, options.trust_remote_code)
    if inputs.uses_tied_embeddings() and not getattr(hf_config, "tie_word_embeddings", False):
        raise OutputError(
            f"base model {inputs.base.label} has no lm_head.weight but its config does not tie the embeddings"
        )

    device = options.resolved_device()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise OutputError(f"--device {device} was asked for, but torch sees no CUDA device")
    seed = options.random_seed
    if seed is None:
        import secrets

        seed = secrets.randbits(31)
    if not 0 <= seed < 2**64:
        raise InvalidArgumentError(f"--random-seed must be between 0 and 2**64 - 1, got {seed}")
    has_shared_gate = arch.shared_gate_name(inputs.base.layout.prefix, 0) is not None
    routed, shared = compute_gates(
        config.gate_mode, inputs, options, seed, quiet=options.quiet, shared_gates=has_shared_gate, config=config
    )
    tensors = plan_tensors(config, inputs, arch, out_code, routed, shared)

    text = hf_config.to_json_string(use_diff=True)
    data = json.loads(text)
    data.pop("transformers_version", None)
    data["transformers_version"] = _transformers_version()
    with OutputTransaction(out, owned=OUTPUT_FILES) as txn:
        writer = txn.open_shards([(t.name, t.dtype, list(t.shape)) for t in tensors], options.out_shard_size)
        _write_sidecars(config, inputs, txn, options, seed)
        _write_tensors(tensors, writer, seed, options.quiet)
        txn.commit(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return MoEResult(arch.name, arch.hf_class, out, seed, tensors, _uses_seed(config))


def _uses_seed(config: MoEConfig) -> bool:
    return config.gate_mode in RANDOM_GATE_MODES or any(e.noise_scale for _, e in config.all_experts())


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write_tensors(tensors, writer, seed: int, quiet: bool) -> None:
    from ..io.tensor_stream import write_all

    if quiet:
        write_all(tensors, writer, seed)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..progress import stderr_progress

    with stderr_progress(
        TextColumn("[bold]writing"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("write", total=len(tensors))
        write_all(tensors, writer, seed, lambda _t: bar.update(task, advance=1))


def _write_sidecars(config: MoEConfig, inputs: MoEInputs, out, options: MoEOptions, seed: int) -> None:
    """The base's side files and tokenizer, and the config copy, into the OutputTransaction ``out``."""
    out.copy_files(inputs.base.path, SIDECAR_FILES)
    if options.copy_tokenizer:
        from ..tokenizer.write import copy_tokenizer

        copy_tokenizer(inputs.base.path, out.dir)
    text = config.source_text or config.to_yaml()
    text = text if text.endswith("\n") else text + "\n"
    if _uses_seed(config):
        text += f"# built with --random-seed {seed}; pass it again to reproduce this model exactly\n"
    out.write_text(CONFIG_COPY, text)
