"""Shared body of the merge commands: load, plan or merge, and report errors without tracebacks."""

from __future__ import annotations

from .shell import command_shell, stdout_console


def run_command(
    config_file: str, out_path: str | None, kwargs: dict, plan_only: bool = False, json_path: str | None = None
) -> None:
    from .options import build_options

    with command_shell(
        "no merged model was written; the output directory is as it was, and running the same merge again resumes it"
    ) as console:
        options, dry_run = build_options(kwargs, console)
        from ..api import plan_merge, run_merge
        from ..config import load_config_file

        config = load_config_file(config_file)
        note_differences(config, console, options.quiet)
        if plan_only or dry_run:
            from .report import print_plan

            plan = plan_merge(config, out_path, options)
            print_plan(plan, stdout_console())
            if json_path is not None:
                from pathlib import Path

                Path(json_path).write_text(plan.to_json())
                console.print(f"plan written to {json_path}")
            return
        reports = []
        run_merge(config, out_path, options, on_health=reports.append)
        print_health(reports[0], console, problems_only=options.quiet)
        console.print(f"[green]done:[/] merged model written to {out_path}")


def print_health(report, console, problems_only: bool = False) -> None:
    """The health summary: the totals line (left out with ``problems_only``), then a warning per problem."""
    from rich.markup import escape

    head, *warnings = report.summary_lines()
    if not problems_only:
        console.print(escape(head), highlight=False, soft_wrap=True)
    for line in warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def note_differences(config, console, quiet: bool) -> None:
    """One line when the config touches a documented difference from mergekit; with -v, each."""
    import logging

    from ..differences import touched_differences

    touched = touched_differences(config)
    if not touched or quiet:
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
