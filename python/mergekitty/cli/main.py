"""``mergekitty``: the command group (merge, plan)."""

from __future__ import annotations

import rich_click as click

from .options import merge_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekitty")
def group() -> None:
    """Merge pretrained language models from a YAML config."""


@group.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@merge_options
def merge(config_file: str, out_path: str, **kwargs) -> None:
    """Merge the models described by CONFIG_FILE and write the result to OUT_PATH."""
    from .run import run_command

    run_command(config_file, out_path, kwargs)


@group.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False), required=False)
@merge_options
def plan(config_file: str, out_path: str | None, **kwargs) -> None:
    """Print what merging CONFIG_FILE would do (layer map, output size, peak memory) without reading weights."""
    from .run import run_command

    run_command(config_file, out_path, kwargs, plan_only=True)


if __name__ == "__main__":
    group()
