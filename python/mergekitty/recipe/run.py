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
    """Whether ``path`` holds a written model: config.json and the weights a Checkpoint finds."""
    from ..errors import MergekittyError
    from ..io.checkpoint import Checkpoint

    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        Checkpoint(p)
    except (MergekittyError, OSError):
        return False
    return True


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
    from ..api import MergeOptions, Phase, write_model
    from ..extras import require_torch_for_plan

    options = options or MergeOptions()
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    targets = list(outputs)
    written = dict(outputs)  # every directory written: each is checked against the models read
    if write_intermediates is not None:
        for doc in recipe.needed_for(targets, set(on_disk or {})):
            if doc.name not in outputs:
                written[doc.name] = Path(write_intermediates) / doc.name
    rplan = plan_recipe(recipe, targets, options, on_disk, written)
    for stage in rplan.stages:
        require_torch_for_plan(stage.plan)
    if on_phase is not None:
        on_phase(Phase("plan", time.perf_counter() - started))
    if on_plan is not None:
        on_plan(rplan)
    if write_intermediates is not None:
        for stage in rplan.stages:
            if stage.name not in targets:
                log.info("writing intermediate '%s' to %s", stage.name, written[stage.name])
                write_model(stage.plan, stage.document.config, written[stage.name], options, progress, None, on_phase)
    text = _recorded(rplan, options) if len(recipe.documents) > 1 else None
    for name in targets:
        stage = rplan[name]
        write_model(stage.plan, stage.document.config, outputs[name], options, progress, on_health, on_phase, text)
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
