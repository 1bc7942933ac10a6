"""``mergekitty inspect MODEL...``: how the models differ from a base, layer by layer, before a
merge's weights are chosen (``mergekitty.inspect``)."""

from __future__ import annotations

from pathlib import Path

import rich_click as click

from .shell import command_shell, stdout_console
from .verbosity import Verbosity, verbosity_options

REPORT_SUFFIXES = (".html", ".htm", ".png")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1)
@click.option("--base", default=None, help="The base model the task vectors are taken from. [default: the first model]")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A merge config: also show the parameters it gives each layer (gradients, filters); its models and "
    "base are inspected when none are given.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a report: .html (tables and the picture, one file) or .png (the picture).",
)
@click.option(
    "--density",
    type=float,
    default=0.5,
    show_default=True,
    help="The density the TIES keep fraction and the DARE spread are computed for.",
)
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the figures as JSON instead of the tables.")
@click.option(
    "-j", "--threads", type=int, default=0, help="CPU threads for the native kernel; 0 uses every core. [default: 0]"
)
@click.option("--transformers-cache", default=None, help="Cache directory for models downloaded from the hub.")
@verbosity_options
def main(
    models: tuple[str, ...],
    base: str | None,
    config_file: str | None,
    output: str | None,
    density: float,
    as_json: bool,
    threads: int,
    transformers_cache: str | None,
    quiet: bool,
    verbose: int,
) -> None:
    """Show how MODELs differ from a base, per layer and module kind: the size of each task vector
    (model - base) relative to the base, the cosine and sign agreement of each pair, how much of each
    TIES would keep and how unevenly DARE would. Reads the models tensor by tensor; nothing is
    loaded whole."""
    verbosity = Verbosity.from_flags(quiet, verbose)
    with command_shell("nothing was written", verbosity) as console:
        from ..errors import InvalidArgumentError

        if output is not None and Path(output).suffix.lower() not in REPORT_SUFFIXES:
            raise InvalidArgumentError(f"-o {output}: the report is written as .html or .png")
        if output is not None and Path(output).suffix.lower() == ".png":
            from ..errors import OutputError
            from ..inspect.picture import MISSING_MATPLOTLIB, have_matplotlib

            if not have_matplotlib():
                raise OutputError(MISSING_MATPLOTLIB)
        if not 0 < density <= 1:
            raise InvalidArgumentError(f"--density must be in (0, 1], got {density}")
        inspection = _inspect(models, base, config_file, density, threads, transformers_cache, quiet, console)
        if as_json:
            import json

            click.echo(json.dumps(inspection.to_dict(), indent=2))
        else:
            from ..inspect.table import print_tables

            print_tables(inspection, stdout_console())
        if output is not None:
            _write_report(inspection, Path(output))
            console.print(f"report written to {output}", highlight=False, soft_wrap=True)


def _inspect(models, base, config_file, density, threads, cache, quiet, console):
    from ..errors import InvalidArgumentError
    from ..inspect.config_params import config_parameters, plan_config
    from ..inspect.scan import OpenModel, check_distinct, grid_of, open_model

    plan = plan_config(config_file, cache_dir=cache) if config_file is not None else None
    opened: dict[str, OpenModel] = {}
    if plan is not None:
        from ..io.checkpoint import Checkpoint

        for m in plan.models:
            if m.adapter is not None:
                raise InvalidArgumentError(
                    f"{m.label}: inspect reads the weights as stored; merge the LoRA adapter first (mergekitty merge-lora)"
                )
        # the config's models, as the plan resolved them
        opened = {m.label: OpenModel(m.label, m.path, Checkpoint(m.path, label=m.label)) for m in plan.models}
        if base is None and plan.base is not None:
            base = plan.models[plan.base].label
        if not models:
            models = tuple(m.label for m in plan.models)

    def get(ref: str) -> OpenModel:
        if ref not in opened:
            opened[ref] = open_model(ref, cache)
        return opened[ref]

    if not models:
        raise InvalidArgumentError("give the models to inspect (or a merge config with --config)")
    base_model = get(base if base is not None else models[0])
    others = check_distinct(base_model, [get(m) for m in models if m != base_model.label])
    grid = grid_of(base_model)
    inspection = _scan(base_model, others, density, threads, grid, quiet, console)
    if plan is not None:
        inspection.parameters = config_parameters(plan, grid)
    return inspection


def _scan(base, models, density, threads, grid, quiet, console):
    from ..inspect.scan import inspect_models

    if quiet or not console.is_terminal:
        return inspect_models(base, models, density, threads, grid)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    total = sum(i.nbytes for m in (base, *models) for i in m.checkpoint.infos.values())
    columns = [TextColumn("[bold]inspecting"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("inspect", total=total or 1)
        return inspect_models(
            base, models, density, threads, grid, on_tensor=lambda _name, nbytes: bar.advance(task, nbytes)
        )


def _write_report(inspection, path: Path) -> None:
    from ..inspect.picture import MISSING_MATPLOTLIB, have_matplotlib, render_png

    if path.suffix.lower() == ".png":
        path.write_bytes(render_png(inspection))
        return
    from ..inspect.report_html import render_html

    png = render_png(inspection) if have_matplotlib() else None
    note = None if png is not None else f"No picture: {MISSING_MATPLOTLIB}."
    path.write_text(render_html(inspection, png, note), encoding="utf-8")
