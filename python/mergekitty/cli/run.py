"""Shared body of the merge commands: load, plan or merge, and report errors without tracebacks."""

from __future__ import annotations

from dataclasses import replace

from .shell import command_shell, stdout_console
from .verbosity import Verbosity


def run_command(
    config_file: str,
    out_path: str | None,
    kwargs: dict,
    plan_only: bool = False,
    json_path: str | None = None,
    raw: str | None = None,
) -> None:
    """``raw``: a merge of plain state dicts (raw_merge.py), with its policy for tensors some
    models lack ("error", "intersection", "union"); None for a merge of models (or a recipe)."""
    from .options import MERGE_LEGACY, RAW_LEGACY, RAW_NO_EFFECT, build_options, take_verbosity

    verbosity = take_verbosity(kwargs)
    intermediates = kwargs.pop("write_intermediates", None)
    with command_shell(INTERRUPTED, verbosity) as console:
        legacy = [] if plan_only else RAW_LEGACY if raw is not None else MERGE_LEGACY
        options, dry_run = build_options(kwargs, console, legacy, RAW_NO_EFFECT if raw is not None else None)
        from ..config import load_config_file
        from ..recipe.documents import is_recipe_file

        if raw is None and is_recipe_file(config_file):
            from .recipe import final_document, run_recipe_command

            recipe, final = final_document(config_file)
            outputs = {final: out_path} if out_path is not None else {}
            run_recipe_command(
                recipe, outputs, options, verbosity, console, plan_only or dry_run, json_path, intermediates, [final]
            )
            return
        if intermediates is not None:
            console.print(
                "[yellow]note:[/] --write-intermediates has no effect: the config holds one merge",
                highlight=False,
                soft_wrap=True,
            )
        config = load_config_file(config_file)
        merge_loaded(config, out_path, options, verbosity, console, plan_only or dry_run, json_path, raw=raw)


# what Ctrl-C leaves of a merge
INTERRUPTED = (
    "no merged model was written; the output directory is as it was, and running the same merge again resumes it"
)


def merge_loaded(
    config,
    out_path: str | None,
    options,
    verbosity: Verbosity,
    console,
    plan_only: bool = False,
    json_path: str | None = None,
    plan_console=None,
    raw: str | None = None,
) -> None:
    """Plan (``plan_only``: print the plan, on ``plan_console`` if given, else stdout) or merge
    the loaded ``config`` into ``out_path``, narrated on ``console`` as ``verbosity`` asks;
    ``raw`` as for ``run_command``."""
    # the bar is left out under -q, and under -vv, whose line per tensor shows the progress
    options = replace(options, quiet=verbosity.quiet or verbosity.per_tensor)
    if raw is None:
        from ..api import plan_merge, run_merge
    else:
        from functools import partial

        from ..raw_merge import plan_raw_merge, run_raw_merge

        plan_merge, run_merge = partial(plan_raw_merge, missing=raw), partial(run_raw_merge, missing=raw)

    if raw is None:  # the documented differences are about models (heads, tokenizers), not state dicts
        note_differences(config, console)
    if plan_only:
        plan = plan_merge(config, out_path, options)
        write_plan(plan, json_path, console, plan_console)
        return
    from .report import MergeNarration

    narration = MergeNarration(console, verbosity)
    reports = []
    run_merge(
        config,
        out_path,
        options,
        progress=narration.tensor if verbosity.per_tensor else None,
        on_health=reports.append,
        on_plan=narration.planned,
        on_phase=narration.phase,
    )
    print_health(reports[0], console)
    narration.finish()
    console.print(f"[green]done:[/] merged model written to {out_path}", highlight=False, soft_wrap=True)


def write_plan(plan, json_path: str | None, console, plan_console=None) -> None:
    """The plan on stdout (the table, or with ``--json -`` the JSON) or ``plan_console``, and to a
    JSON file if asked."""
    import sys

    from .report import print_plan

    if json_path == "-":
        sys.stdout.write(plan.to_json() + "\n")
        return
    print_plan(plan, plan_console or stdout_console())
    if json_path is not None:
        from pathlib import Path

        Path(json_path).write_text(plan.to_json())
        console.print(f"plan written to {json_path}", highlight=False, soft_wrap=True)


def print_health(report, console) -> None:
    """The health summary: the totals line, then a warning per problem."""
    from rich.markup import escape

    head, *warnings = report.summary_lines()
    console.print(escape(head), highlight=False, soft_wrap=True)
    for line in warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def note_differences(config, console) -> None:
    """One line when the config (or the configs of a recipe, a list) touches a documented
    difference from mergekit; with -v, each."""
    import logging

    from ..differences import touched_differences

    configs = config if isinstance(config, list) else [config]
    touched = list({d.name: d for c in configs for d in touched_differences(c)}.values())
    if not touched:
        return
    console.print(
        f"[cyan]note:[/] this config touches {len(touched)} documented difference(s) from mergekit: "
        + ", ".join(d.name for d in touched)
        + " (-v explains each; README: Differences from mergekit and mergekitty)",
        highlight=False,
        soft_wrap=True,
    )
    log = logging.getLogger("mergekitty.differences")
    for d in touched:
        log.info("%s: %s", d.name, d.detail)
