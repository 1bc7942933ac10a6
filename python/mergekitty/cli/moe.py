"""``mergekitty-moe CONFIG OUT``: build a mixture of experts from dense models."""

from __future__ import annotations

import rich_click as click

from .options import command, legacy_options, messages_panel, note_legacy, opt, panel
from .shell import command_shell
from .verbosity import Verbosity

MOE_LEGACY = ["load_in_4bit", "load_in_8bit"]
# mergekit's name of --allow-untrained, too long for the help's column of names
UNTRAINED = "--i-understand-this-is-not-useful-without-training"


@command(legacy=MOE_LEGACY, epilog=f"{UNTRAINED}: the old spelling of --allow-untrained.")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@panel(
    "Compute",
    [
        opt("device", "--device", default="cpu", show_default=True,
            help="Where the base model runs for hidden-state gates: cpu, cuda, cuda:N or auto."),
        opt("batch_size", "--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
            help="Prompts per forward pass of the base model."),
    ],
)  # fmt: skip
@panel(
    "Inputs",
    [
        opt("strict", "--strict", is_flag=True, default=False,
            help="Config keys the build does not read are errors, not warnings."),
        opt("random_seed", "--random-seed", type=int, default=None,
            help="Seed for random gates and expert noise (recorded in mergekitty_moe_config.yml); a fresh one if not given."),
        opt("trust_remote_code", "--trust-remote-code/--no-trust-remote-code", default=False, show_default=True,
            help="Allow custom model code when loading the base model for gates."),
        opt("allow_untrained", "--allow-untrained", is_flag=True, default=False,
            help="Allow experts that are all the same model, and silence the warning about random gates "
            "(old spelling: see below)."),
    ],
)  # fmt: skip
@panel(
    "Output",
    [
        "out_shard_size",
        opt("copy_tokenizer", "--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
            help="Copy the base model's tokenizer files."),
    ],
)  # fmt: skip
@messages_panel
@legacy_options(MOE_LEGACY)
@click.option(UNTRAINED, "allow_untrained_old", is_flag=True, default=False, hidden=True)
def main(config_file: str, out_path: str, quiet: bool, verbose: int, allow_untrained_old: bool, **kwargs) -> None:
    """Build the mixture of experts described by CONFIG_FILE (YAML) and write it to OUT_PATH.

    The base model gives embeddings, attention, norms and head; each expert's MLP comes
    from its source_model; the routers come from the prompts (gate_mode).
    """
    verbosity = Verbosity.from_flags(quiet, verbose)
    kwargs["allow_untrained"] = kwargs["allow_untrained"] or allow_untrained_old
    with command_shell("no model was written; the output directory is as it was", verbosity) as console:
        note_legacy(kwargs, console, MOE_LEGACY)
        from ..moe import MoEOptions, build_moe
        from ..moe.config import load_moe_config_file

        config = load_moe_config_file(config_file)
        result = build_moe(config, out_path, MoEOptions(quiet=verbosity.quiet, **kwargs))
        console.print(
            f"[green]done:[/] {result.hf_class} with {len(config.experts)} experts written to {out_path}",
            highlight=False,
        )
        if result.architecture == "deepseek":
            from ..moe.deepseek import REMOTE_CODE

            console.print(
                f"[yellow]note:[/] transformers has no class for this model; load it with trust_remote_code=True (code from {REMOTE_CODE})",
                highlight=False,
            )
        if result.used_seed:
            console.print(
                f"random seed: {result.seed} (pass --random-seed {result.seed} to build the same model again)",
                highlight=False,
            )


if __name__ == "__main__":
    main()
