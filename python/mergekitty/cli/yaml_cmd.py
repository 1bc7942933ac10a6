"""``mergekitty-yaml CONFIG OUT``: the classic entry point."""

from __future__ import annotations

import rich_click as click

from .options import MERGE_LEGACY, command, merge_options


@command(legacy=MERGE_LEGACY, device_aliases=True)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@merge_options
def main(config_file: str, out_path: str, **kwargs) -> None:
    """Merge the models described by CONFIG_FILE (YAML) and write the result to OUT_PATH."""
    from .run import run_command

    run_command(config_file, out_path, kwargs)


if __name__ == "__main__":
    main()
