"""Run a recipe: plan it as one merge (recipe.plan), then write each target through the one
output transaction. Intermediate documents are written only when asked (``write_intermediates``);
otherwise their tensors are computed in memory as the targets read them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .documents import Recipe, load_recipe
from .plan import RecipePlan, plan_recipe

__all__ = ["run_recipe", "complete_model_dir"]

log = logging.getLogger(__name__)


def complete_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a written model: config.json and weights."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))


def run_recipe(
    recipe: Recipe | str | os.PathLike[str],
    outputs: Mapping[str, str | os.PathLike[str]],
    options: Any = None,
    *,
    write_intermediates: str | os.PathLike[str] | None = None,
    on_disk: Mapping[str, Path] | None = None,
    on_plan: Callable[[RecipePlan], None] | None = None,
    progress: Callable[[Any, float], None] | None = None,
    on_phase: Callable[[Any], None] | None = None,
    on_health: Callable[[Any], None] | None = None,
) -> RecipePlan:
    """Write each document named in ``outputs`` (name -> output directory), computing the
    documents they read in memory. ``write_intermediates``: a directory that also receives
    every intermediate document, as ``DIR/<name>``. ``on_disk``: documents to read from a
    directory written before instead of computing them. Returns the recipe plan."""
    from ..api import MergeOptions, Phase
    from ..extras import require_torch_for_plan

    options = options or MergeOptions()
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    targets = list(outputs)
    rplan = plan_recipe(recipe, targets, options, on_disk, outputs)
    for stage in rplan.stages:
        require_torch_for_plan(stage.plan)
    if on_phase is not None:
        on_phase(Phase("plan", time.perf_counter() - started))
    if on_plan is not None:
        on_plan(rplan)
    if write_intermediates is not None:
        for stage in rplan.stages:
            if stage.name not in targets:
                where = Path(write_intermediates) / stage.name
                log.info("writing intermediate '%s' to %s", stage.name, where)
                _write(stage, where, options, progress, None, on_phase, None)
    for name in targets:
        text = _recorded(rplan, options) if len(recipe.documents) > 1 else None
        _write(rplan[name], outputs[name], options, progress, on_health, on_phase, text)
    return rplan


def _recorded(rplan: RecipePlan, options: Any) -> str:
    """The recipe as a target keeps it: every document as written, each with the seed its merge
    drew (``api.recorded_config``), so that the whole recipe can be run again to the same bytes."""
    from ..api import recorded_config

    planned = {s.name: s for s in rplan.stages}
    texts = []
    for doc in rplan.recipe.documents:
        stage = planned.get(doc.name)
        text = doc.config.source_text or doc.config.to_yaml()
        texts.append(recorded_config(stage.plan, doc.config, options) if stage is not None else text)
    return "---\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


def _write(
    stage: Any,
    out_path: str | os.PathLike[str],
    options: Any,
    progress: Callable[[Any, float], None] | None,
    on_health: Callable[[Any], None] | None,
    on_phase: Callable[[Any], None] | None,
    recorded_text: str | None,
) -> None:
    """One document's merge written as ``run_merge`` writes a model; ``recorded_text``: the YAML
    the model card and mergekitty_config.yml keep (the whole recipe, for a target)."""
    import json

    from ..api import _write_sidecars, write_merged_model

    plan, config = stage.plan, stage.document.config
    write_merged_model(
        plan,
        out_path,
        options,
        side_files=lambda out: _write_sidecars(plan, config, out, options, recorded_text),
        marker_text=json.dumps(plan.out_config, indent=2) + "\n",
        progress=progress,
        on_health=on_health,
        on_phase=on_phase,
    )
