"""Shared body of the merge commands: load, plan or merge, and report errors without tracebacks."""

from __future__ import annotations

from rich.console import Console

from .shell import command_shell


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
        if plan_only or dry_run:
            from .report import print_plan

            plan = plan_merge(config, out_path, options)
            print_plan(plan, Console())
            if json_path is not None:
                from pathlib import Path

                Path(json_path).write_text(plan.to_json())
                console.print(f"plan written to {json_path}")
            return
        run_merge(config, out_path, options)
        console.print(f"[green]done:[/] merged model written to {out_path}")
