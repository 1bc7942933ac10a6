"""``mergekitty-merge-lora BASE ADAPTER OUT``: write BASE with a LoRA adapter merged in."""

from __future__ import annotations

import rich_click as click

from .options import merge_options
from .shell import command_shell, stdout_console


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekitty", message="mergekitty %(version)s")
@click.argument("base_model")
@click.argument("adapter_model")
@click.argument("output_path", type=click.Path())
@merge_options
def main(base_model: str, adapter_model: str, output_path: str, **kwargs) -> None:
    """Apply the PEFT LoRA adapter ADAPTER_MODEL to BASE_MODEL and write the full model to OUTPUT_PATH."""

    from .options import build_options

    with command_shell("no merged model was written; the output directory is as it was") as console:
        options, dry_run = build_options(kwargs, console)
        from ..lora.merge import merge_lora

        if dry_run:
            changed = merge_lora(base_model, adapter_model, output_path, options, dry_run=True)
            stdout_console().print(f"[bold]tensors the adapter changes:[/] {len(changed)}")
            for name in changed:
                stdout_console().print(f"  {name}", highlight=False)
            return
        changed = merge_lora(base_model, adapter_model, output_path, options)
    console.print(
        f"[green]done:[/] {len(changed)} tensors changed by the adapter; merged model written to {output_path}"
    )


if __name__ == "__main__":
    main()
