"""``mergekitty-merge-lora BASE ADAPTER OUT``: write BASE with a LoRA adapter merged in."""

from __future__ import annotations

import rich_click as click

from .options import MERGE_LORA_LEGACY, command, merge_lora_options
from .shell import command_shell, stdout_console


@command(legacy=MERGE_LORA_LEGACY, device_aliases=True)
@click.argument("base_model")
@click.argument("adapter_model")
@click.argument("output_path", type=click.Path())
@merge_lora_options
def main(base_model: str, adapter_model: str, output_path: str, **kwargs) -> None:
    """Apply the PEFT LoRA adapter ADAPTER_MODEL to BASE_MODEL and write the full model to OUTPUT_PATH."""

    from .options import build_options, take_verbosity

    verbosity = take_verbosity(kwargs)
    with command_shell("no merged model was written; the output directory is as it was", verbosity) as console:
        options, dry_run = build_options(kwargs, console, MERGE_LORA_LEGACY)
        from ..lora.merge import merge_lora

        if dry_run:
            changed = merge_lora(base_model, adapter_model, output_path, options, dry_run=True)
            out = stdout_console()
            out.print(f"[bold]tensors the adapter changes:[/] {len(changed)}")
            for name in changed:
                out.print(f"  {name}", highlight=False, markup=False)
            return
        changed = merge_lora(base_model, adapter_model, output_path, options)
        console.print(
            f"[green]done:[/] {len(changed)} tensors changed by the adapter; merged model written to {output_path}",
            highlight=False,
            soft_wrap=True,
        )


if __name__ == "__main__":
    main()
