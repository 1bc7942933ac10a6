"""``merge_lora``: write a full model, a base with a LoRA adapter applied.

The output is streamed tensor by tensor through the native ``ShardWriter``: tensors
the adapter leaves alone are copied straight from the base's memory maps, changed
ones are computed as they are written (``lora.apply.LoraCheckpoint``). The tokenizer
is the adapter's when it ships one (an adapter that added tokens does), else the
base's; ``config.json`` is written last, so an interrupted run leaves no directory
that loads as a model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import OutputError

log = logging.getLogger(__name__)


def _card(base: str, adapter: str, adapter_cfg: dict[str, Any], changed: int, title: str) -> str:
    from ..card import front_matter, hub_link, is_hub_id, made_with

    front: dict[str, Any] = {"library_name": "transformers", "tags": ["mergekitty", "lora", "merge"]}
    hubs = [r for r in (base.split("@")[0], adapter.split("@")[0]) if is_hub_id(r)]
    if hubs:
        front["base_model"] = hubs
    scale = "lora_alpha / sqrt(r)" if adapter_cfg.get("use_rslora") else "lora_alpha / r"
    return "\n".join(
        [
            *front_matter(front),
            f"# {title}",
            "",
            f"This model is a base model with a LoRA adapter merged into its weights, made with {made_with('mergekitty-merge-lora')}.",
            "",
            f"* Base model: {hub_link(base)}",
            f"* LoRA adapter: {hub_link(adapter)} (r = {adapter_cfg.get('r')}, lora_alpha = {adapter_cfg.get('lora_alpha')}, scale {scale})",
            f"* Tensors changed by the adapter: {changed}",
            "",
        ]
    )


def merge_lora(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out_path: str | os.PathLike,
    options=None,
    progress: Callable[[str, int, int], None] | None = None,
    dry_run: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Apply the LoRA ``adapter`` to ``base`` and write the full model to ``out_path``.

    ``base`` and ``adapter`` are local directories or hub ids (``path[@revision]``);
    ``options`` is an ``api.MergeOptions`` (device, out_shard_size, copy_tokenizer,
    write_model_card, transformers_cache), with ``kwargs`` overriding its fields.
    Returns the names of the tensors the adapter changes; with ``dry_run`` only the
    checks run (headers only) and nothing is written.
    """
    from ..api import MergeOptions
    from ..io.checkpoint import Checkpoint
    from ..io.output import SIDECAR_FILES, OutputTransaction, check_output_path
    from ..ops.reduce import bytes_view
    from ..refs import ModelPath, resolve_local_path
    from .adapter import Adapter
    from .apply import LoraCheckpoint

    options = replace(options or MergeOptions(), **kwargs)
    base_ref = ModelPath.model_validate(str(base))
    adapter_ref = ModelPath.model_validate(str(adapter))
    if "+" in str(base):
        raise OutputError(f"the base model '{base}' must not itself be a model+lora reference")
    base_dir = resolve_local_path(base_ref.path, base_ref.revision, options.transformers_cache)
    adapter_dir = resolve_local_path(adapter_ref.path, adapter_ref.revision, options.transformers_cache)
    lora = Adapter(adapter_dir, label=str(adapter))
    other_base = lora.other_base_warning(base_ref.path, base_dir)
    if other_base:
        log.warning("%s", other_base)
    device = options.resolved_device()
    model = LoraCheckpoint(Checkpoint(Path(base_dir), label=str(base)), lora, label=f"{base}+{adapter}", device=device)

    check_output_path(
        out_path, [(Path(base_dir), f"base model {base_dir}"), (Path(adapter_dir), f"adapter {adapter_dir}")]
    )
    if dry_run:
        return model.changed()
    names = model.names()
    layout = [(n, model.infos[n].dtype, list(model.infos[n].shape)) for n in names]
    with OutputTransaction(out_path) as out:
        writer = out.open_shards(layout, options.out_shard_size)
        out.copy_files(base_dir, SIDECAR_FILES)
        if options.copy_tokenizer:
            from ..tokenizer.write import copy_tokenizer

            copy_tokenizer(lora.tokenizer_dir() or Path(base_dir), out.dir)
        for i, name in enumerate(names):
            view = model.view(name)
            if view is not None:
                writer.write(name, view)
            else:
                writer.write(name, bytes_view(model.tensor(name).contiguous()))
            model.release(name)
            if progress is not None:
                progress(name, i + 1, len(names))
        if options.write_model_card:
            card = _card(str(base), str(adapter), lora.config, len(model.changed()), out.path.name)
            out.write_text("README.md", card)
        out.commit(json.dumps(model.config(), indent=2) + "\n")
    return model.changed()
