"""Recipes on the command line: ``mergekitty merge`` of a multi-document file (its final merge to
OUT), ``mergekitty-mega CONFIG OUT`` (every result to OUT/<name>) and ``mergekitty multi CONFIG
--out-path OUT`` (the unnamed merge to OUT, named results to --intermediate-dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rich_click as click

from .options import MERGE_LEGACY, command, merge_options, opt, panel
from .shell import command_shell, stdout_console

# what Ctrl-C leaves of a recipe
INTERRUPTED = "the output being written is as it was before this run; outputs finished before it are complete"


def final_document(config_file: str) -> tuple[Any, str]:
    """The recipe in ``config_file`` and the document ``mergekitty merge`` writes: the unnamed
    one, else the only one no other document reads."""
    from ..errors import ConfigError
    from ..recipe import load_recipe

    recipe = load_recipe(config_file)
    if recipe.unnamed is not None:
        return recipe, recipe.unnamed.name
    sinks = [d.name for d in recipe.sinks]
    if len(sinks) > 1:
        raise ConfigError(
            f"the recipe has {len(sinks)} results ({', '.join(sinks)}), read by no other document: leave the final "
            "one unnamed, or write every result with mergekitty-mega",
            source=recipe.source,
        )
    return recipe, sinks[0]


def existing(directory: Path) -> Path | None:
    from ..recipe.run import complete_model_dir

    return directory if complete_model_dir(directory) else None


def run_recipe_command(
    recipe,
    outputs: dict[str, Any],
    options,
    verbosity,
    console,
    plan_only: bool,
    json_path: str | None,
    intermediates: str | None,
    targets: list[str],
    on_disk: dict[str, Path] | None = None,
) -> None:
    """Plan (print it) or run ``recipe`` for ``targets`` (written to ``outputs``), narrated on ``console``."""
    from dataclasses import replace

    from rich.markup import escape

    from ..recipe import plan_recipe, run_recipe
    from .report import MergeNarration
    from .run import note_differences, print_health, write_plan

    options = replace(options, quiet=verbosity.quiet or verbosity.per_tensor)
    note_differences([doc.config for doc in recipe.documents], console)
    if plan_only:
        # the recipe's stages, then each target's plan (``--json`` comes with one target: plan, merge)
        rplan = plan_recipe(recipe, targets, options, on_disk, outputs)
        out = stdout_console()
        if json_path != "-":
            out.print(escape(rplan.summary(outputs)), highlight=False, soft_wrap=True)
        for name in targets:
            if len(targets) > 1:
                out.print(f"\n[bold]{escape(name)}[/]", highlight=False)
            write_plan(rplan[name].plan, json_path, console)
        return
    narration = MergeNarration(console, verbosity)
    reports: list[Any] = []
    run_recipe(
        recipe,
        outputs,
        options,
        write_intermediates=intermediates,
        on_disk=on_disk,
        on_plan=narration.planned,
        progress=narration.tensor if verbosity.per_tensor else None,
        on_phase=narration.phase,
        on_health=reports.append,
    )
    for report in reports:
        print_health(report, console)
    narration.finish()
    for name, path in outputs.items():
        console.print(f"[green]done:[/] {escape(name)} written to {escape(str(path))}", highlight=False, soft_wrap=True)


@command(legacy=MERGE_LEGACY, device_aliases=True)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@panel(
    "Recipe",
    [
        opt(
            "force",
            "-f",
            "--force",
            is_flag=True,
            default=False,
            help="Merge again the documents whose OUT_PATH/<name> already holds a model (default: use it as it is).",
        ),
        opt(
            "require_nameless",
            "-R",
            "--require-nameless",
            is_flag=True,
            default=False,
            help="Require exactly one unnamed document (the final merge).",
        ),
    ],
)
@merge_options
def mega(config_file: str, out_path: str, force: bool, require_nameless: bool, **kwargs) -> None:
    """Run the multi-document recipe CONFIG_FILE, writing each result (a document no other reads) to
    OUT_PATH/<name>. The documents they read are computed in memory, never written (unless
    --write-intermediates); one already in OUT_PATH/<name> is used as it is unless --force."""
    from .options import build_options, take_verbosity

    verbosity = take_verbosity(kwargs)
    intermediates = kwargs.pop("write_intermediates", None)
    with command_shell(INTERRUPTED, verbosity) as console:
        options, dry_run = build_options(kwargs, console, MERGE_LEGACY)
        from ..recipe import load_recipe

        recipe = load_recipe(config_file, require_nameless=require_nameless)
        root = Path(out_path)
        on_disk = {} if force else {d.name: p for d in recipe.documents if (p := existing(root / d.name)) is not None}
        targets = [d.name for d in recipe.sinks]
        for name in [t for t in targets if t in on_disk]:
            console.print(f"skipped {name}: {root / name} already holds a model (--force merges it again)")
        targets = [t for t in targets if t not in on_disk]
        if not targets:
            return
        outputs = {name: root / name for name in targets}
        run_recipe_command(recipe, outputs, options, verbosity, console, dry_run, None, intermediates, targets, on_disk)


@command(legacy=MERGE_LEGACY, device_aliases=True)
@click.argument("config_file", type=click.Path(dir_okay=False))
@panel(
    "Recipe",
    [
        opt(
            "out_path",
            "--out-path",
            type=click.Path(file_okay=False),
            default=None,
            help="Where the unnamed (final) document is written.",
        ),
        opt(
            "intermediate_dir",
            "-I",
            "--intermediate-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Where named results (documents no other reads) are written, as DIR/<name>; with --lazy, "
            "a document already there is used as it is.",
        ),
        opt(
            "lazy",
            "--lazy/--no-lazy",
            default=True,
            show_default=True,
            help="Use a document's output that already holds a model instead of merging it again.",
        ),
    ],
)
@merge_options
def multi(config_file: str, out_path: str | None, intermediate_dir: str | None, lazy: bool, **kwargs) -> None:
    """Run the multi-document recipe CONFIG_FILE: the unnamed document to --out-path, other results to
    --intermediate-dir. The documents they read are computed in memory, never written (unless
    --write-intermediates)."""
    from .options import build_options, take_verbosity

    verbosity = take_verbosity(kwargs)
    intermediates = kwargs.pop("write_intermediates", None)
    with command_shell(INTERRUPTED, verbosity) as console:
        options, dry_run = build_options(kwargs, console, MERGE_LEGACY)
        from ..errors import ConfigError
        from ..recipe import load_recipe

        recipe = load_recipe(config_file)
        outputs: dict[str, Path] = {}
        for doc in recipe.sinks:
            if not doc.named:
                if out_path is None:
                    raise click.UsageError("the recipe has an unnamed (final) document: give --out-path")
                outputs[doc.name] = Path(out_path)
            elif intermediate_dir is None:
                raise ConfigError(
                    f"document '{doc.name}' is read by no other document and so is a result: give "
                    "--intermediate-dir for it to be written to",
                    key="name",
                    line=doc.line,
                    source=recipe.source,
                )
            else:
                outputs[doc.name] = Path(intermediate_dir) / doc.name
        on_disk: dict[str, Path] = {}
        if lazy and intermediate_dir is not None:
            for doc in recipe.documents:
                if doc.named and (p := existing(Path(intermediate_dir) / doc.name)) is not None:
                    on_disk[doc.name] = p
        if lazy:
            for name, path in list(outputs.items()):
                if name in on_disk or existing(path) is not None:
                    console.print(f"skipped {name}: {path} already holds a model (--no-lazy merges it again)")
                    del outputs[name]
        if not outputs:
            return
        targets = list(outputs)
        run_recipe_command(recipe, outputs, options, verbosity, console, dry_run, None, intermediates, targets, on_disk)
