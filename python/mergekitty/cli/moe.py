"""``mergekitty-moe CONFIG OUT``: build a mixture of experts from dense models."""

from __future__ import annotations

import rich_click as click

from .options import SizeType
from .shell import command_shell, setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekitty", message="mergekitty %(version)s")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the base model runs for hidden-state gates: cpu, cuda, cuda:N or auto.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Prompts per forward pass of the base model.",
)
@click.option(
    "--random-seed",
    type=int,
    default=None,
    help="Seed for random gates and expert noise (recorded in mergekitty_moe_config.yml); a fresh one if not given.",
)
@click.option(
    "--out-shard-size",
    type=SizeType(),
    default="5B",
    help="Maximum size of each output shard in BYTES (5B = five billion bytes, 500M, 1.5G, 512MiB; 0 = one shard). [default: 5B]",
)
@click.option(
    "--copy-tokenizer/--no-copy-tokenizer",
    default=True,
    show_default=True,
    help="Copy the base model's tokenizer files.",
)
@click.option("--quiet/--no-quiet", default=False, show_default=True, help="No progress bars.")
@click.option(
    "--trust-remote-code/--no-trust-remote-code",
    default=False,
    show_default=True,
    help="Allow custom model code when loading the base model for gates.",
)
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_untrained",
    is_flag=True,
    default=False,
    help="Allow experts that are all the same model, and silence the warning about random gates.",
)
@click.option(
    "--strict",
    is_flag=True,
    default=False,
    help="Config keys the build does not read (which mergekit-moe ignores silently, and this tool with a warning) are errors.",
)
@click.option("--load-in-4bit", is_flag=True, default=False, hidden=True)
@click.option("--load-in-8bit", is_flag=True, default=False, hidden=True)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(config_file: str, out_path: str, verbose: int, load_in_4bit: bool, load_in_8bit: bool, **kwargs) -> None:
    """Build the mixture of experts described by CONFIG_FILE (YAML) and write it to OUT_PATH.

    The base model gives embeddings, attention, norms and head; each expert's MLP comes
    from its source_model; the routers come from the prompts (gate_mode).
    """
    setup_logging(verbose)
    with command_shell("no model was written; the output directory is as it was") as console:
        if load_in_4bit or load_in_8bit:
            console.print(
                "[yellow]note:[/] --load-in-4bit/--load-in-8bit have no effect: the base model runs unquantized"
            )
        from ..moe import MoEOptions, build_moe
        from ..moe.config import load_moe_config_file

        config = load_moe_config_file(config_file)
        result = build_moe(config, out_path, MoEOptions(**kwargs))
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
