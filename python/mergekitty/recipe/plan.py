"""Plan a recipe as one merge: each document is planned against the documents it reads as if
they were models (``recipe.stage``), so the final plan's jobs compute every intermediate tensor
from the input checkpoints in memory, tensor by tensor. Nothing of an intermediate is written but
its side files (config.json, tokenizer, layout: what planning the next document reads), into a
cache directory keyed by the stage's plan and its inputs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .documents import Recipe, RecipeDocument
from .stage import Stage

__all__ = ["PlannedStage", "RecipePlan", "plan_recipe", "cache_root"]


@dataclass(frozen=True)
class PlannedStage:
    """One document of a recipe, planned: what reads it, and where its side files are when a
    later document reads it."""

    document: RecipeDocument
    plan: Any  # MergePlan
    directory: Path | None  # its side files (a stage others read), else None

    @property
    def name(self) -> str:
        return self.document.name


@dataclass(frozen=True)
class RecipePlan:
    recipe: Recipe
    stages: tuple[PlannedStage, ...]  # in recipe order; the targets among them
    targets: tuple[str, ...]  # the documents written as outputs
    on_disk: Mapping[str, Path]  # documents read from a directory written before (not planned)

    def __getitem__(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)

    def summary(self, outputs: Mapping[str, Any] | None = None) -> str:
        """What runs: each stage, its method and models, and whether it is fused into the
        documents that read it (computed tensor by tensor as they read it, never written),
        read from disk, or written."""
        from ..sizes import format_size

        lines = [f"recipe: {len(self.recipe.documents)} documents, {len(self.targets)} written"]
        for name, path in self.on_disk.items():
            lines.append(f"stage '{name}': read from {path} (written before)")
        for stage in self.stages:
            plan = stage.plan
            what = f"{plan.method.name} of {', '.join(m.label for m in plan.models)}"
            if stage.name in self.targets:
                where = outputs.get(stage.name) if outputs else None
                role = f"written to {where}" if where else "written"
                lines.append(
                    f"stage '{stage.name}': {what}; {role} (reads {format_size(plan.input_bytes)}, "
                    f"writes {format_size(plan.output_bytes)})"
                )
            else:
                readers = ", ".join(f"'{r}'" for r in self.recipe.readers(stage.name))
                line = f"stage '{stage.name}': {what}; fused into {readers}: computed as read, not written"
                reads = self._reads(stage.name)
                if reads > len(plan.jobs):
                    # a tensor read twice is computed twice: say so
                    line += f" ({reads} reads of its {len(plan.jobs)} tensors: some are computed more than once)"
                lines.append(line)
        return "\n".join(lines)

    def _reads(self, name: str) -> int:
        """How many times stage ``name``'s tensors are computed: once per job that reads one, each
        such job as many times as it is itself computed (a stage read twice by a stage read twice
        is computed four times)."""
        return sum(self._tensor_reads(name).values())

    def _tensor_reads(self, name: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reader in self.stages:
            plan = self[name].plan
            read = [i for i, m in enumerate(reader.plan.models) if m.stage is plan]
            if not read:
                continue
            times = None if reader.name in self.targets else self._tensor_reads(reader.name)
            for i in read:
                for job in reader.plan.jobs:
                    runs = 1 if times is None else times.get(job.out_name, 0)
                    # a job computes a tensor it reads twice once
                    for tensor in {s.tensor for s in (*job.inputs, *job.row_sources) if s.model == i}:
                        counts[tensor] = counts.get(tensor, 0) + runs
        return counts


def plan_recipe(
    recipe: Recipe,
    targets: list[str],
    options: Any,
    on_disk: Mapping[str, Path] | None = None,
    outputs: Mapping[str, Any] | None = None,
) -> RecipePlan:
    """Plan ``targets`` (document names) and every document they read, except those read from
    ``on_disk`` (name -> directory). ``outputs``: name -> output path, checked against the inputs."""
    from ..api import plan_merge

    on_disk = {name: Path(path) for name, path in (on_disk or {}).items()}
    stages: dict[str, Stage | Path] = dict(on_disk)
    planned: list[PlannedStage] = []
    for doc in recipe.needed_for(targets, set(on_disk)):
        out_path = (outputs or {}).get(doc.name)
        plan = plan_merge(doc.config, out_path, options, stages=stages)
        directory = None
        if doc.name not in targets or recipe.readers(doc.name):
            directory = side_files(doc, plan, options)
            stages[doc.name] = Stage(doc.name, plan, directory)
        planned.append(PlannedStage(doc, plan, directory))
    return RecipePlan(recipe, tuple(planned), tuple(targets), on_disk)


def cache_root() -> Path:
    """Where recipe stages keep their side files: $MERGEKITTY_CACHE, else mergekitty under
    $XDG_CACHE_HOME or ~/.cache."""
    explicit = os.environ.get("MERGEKITTY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mergekitty"


def side_files(doc: RecipeDocument, plan: Any, options: Any) -> Path:
    """The directory of a stage's side files (config.json, tokenizer, layout; no weights),
    written once per stage plan and input files. Each run writes its own copy through the output
    transaction and renames it into place, so that runs sharing a stage at the same time each
    find it whole (the first rename wins; the others drop their copy), and a killed one leaves
    only a copy of its own, which is never read."""
    import os
    import secrets
    import shutil

    from ..api import _write_sidecars, plan_digest
    from ..errors import OutputError
    from ..io.output import OutputTransaction

    # the document as written counts too: what it says beyond the plan (a chat template) is in the side files
    key = plan_digest(plan, f"copy_tokenizer={options.copy_tokenizer}", doc.config.to_yaml())
    directory = cache_root() / "stages" / f"{doc.name}-{key[:24]}"
    if (directory / "config.json").is_file():
        return directory
    mine = directory.with_name(f".{directory.name}.{os.getpid()}-{secrets.token_hex(4)}")
    with OutputTransaction(mine) as out:
        _write_sidecars(plan, doc.config, out, replace(options, write_model_card=False))
        out.commit(json.dumps(plan.out_config, indent=2) + "\n")
    try:
        os.rename(mine, directory)
    except OSError as exc:
        shutil.rmtree(mine, ignore_errors=True)
        if not (directory / "config.json").is_file():  # not another run's copy: a real failure
            raise OutputError(f"cannot write the side files of stage '{doc.name}' to {directory}: {exc}") from None
    return directory
