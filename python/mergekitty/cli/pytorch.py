"""``mergekitty pytorch CONFIG OUT`` (also ``mergekitty-pytorch``): merge plain state-dict files."""

from __future__ import annotations

import rich_click as click

from .options import RAW_LEGACY, command, raw_merge_options


@command(legacy=RAW_LEGACY, device_aliases=True)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@raw_merge_options
def main(config_file: str, out_path: str, tensor_intersection: bool, tensor_union: bool, **kwargs) -> None:
    """Merge the state-dict files CONFIG_FILE lists (safetensors or torch .bin/.pt, no config.json)
    tensor by tensor, and write the result to OUT_PATH as safetensors."""
    from .run import run_command

    if tensor_intersection and tensor_union:
        raise click.UsageError("give at most one of -i/--tensor-intersection and -u/--tensor-union")
    missing = "intersection" if tensor_intersection else "union" if tensor_union else "error"
    run_command(config_file, out_path, kwargs, raw=missing)


if __name__ == "__main__":
    main()
