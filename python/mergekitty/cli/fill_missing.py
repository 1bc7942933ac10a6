"""``mergekitty fill-missing BASE_VLM MERGED_TEXT OUT``: a merged language model put back into its
vision-language model."""

from __future__ import annotations

import rich_click as click

from .options import command, messages_panel, opt, panel
from .shell import command_shell, stdout_console
from .verbosity import Verbosity


@command()
@click.argument("base_vlm")
@click.argument("merged_text")
@click.argument("out_path", type=click.Path())
@panel(
    "Inputs",
    [
        opt("prefix", "--prefix", multiple=True, metavar="TEXT=VLM",
            help="How the text model's tensor names become the VLM's: TEXT_PREFIX=VLM_PREFIX "
            "(model.=model.language_model.), or VLM_PREFIX alone to put it before every name (language_model.); "
            "repeatable. [default: inferred from the names]"),
        opt("partial", "--partial", is_flag=True, default=False,
            help="Allow language-model tensors of BASE_VLM that MERGED_TEXT lacks (they keep BASE_VLM's "
            "values). [default: an error naming them]"),
        "transformers_cache",
    ],
)  # fmt: skip
@panel(
    "Output",
    [
        "out_shard_size",
        opt("write_model_card", "--write-model-card/--no-write-model-card", default=True, show_default=True,
            help="Write a README.md saying what came from which model (else BASE_VLM's own is copied)."),
        "dry_run",
    ],
)  # fmt: skip
@messages_panel(verbose_help="-v: also the name mapping used.")
def main(base_vlm: str, merged_text: str, out_path: str, quiet: bool, verbose: int, **kwargs) -> None:
    """Write the vision-language model BASE_VLM to OUT_PATH with the tensors of its language model
    taken from the text-only model MERGED_TEXT (a merge of that language model).

    Every tensor of BASE_VLM is written with its name, shape and dtype; those MERGED_TEXT also has
    (names matched after the prefix difference, e.g. model.layers.0... and
    language_model.model.layers.0...) come from MERGED_TEXT. config.json, the tokenizer and the
    processor files are BASE_VLM's.
    """
    verbosity = Verbosity.from_flags(quiet, verbose)
    with command_shell("no model was written; the output directory is as it was", verbosity) as console:
        from ..fill_missing import fill_missing

        dry_run = kwargs.pop("dry_run")
        prefix = kwargs.pop("prefix")
        if dry_run:
            result = fill_missing(base_vlm, merged_text, out_path, prefix=prefix, dry_run=True, **kwargs)
            out = stdout_console()
            out.print(f"[bold]name mapping:[/] {_mapping(result)}", highlight=False)
            out.print(f"[bold]tensors from {merged_text}:[/] {result.from_text}", highlight=False)
            out.print(f"[bold]tensors from {base_vlm}:[/] {result.from_vlm}", highlight=False)
            for name in result.match.absent:
                out.print(f"  left out: {name}", highlight=False, markup=False)
            return
        result = _run(base_vlm, merged_text, out_path, prefix, kwargs, quiet=verbosity.quiet)
        console.print(
            f"[green]done:[/] {result.from_text} tensors from {merged_text}, {result.from_vlm} from {base_vlm}; "
            f"written to {out_path}",
            highlight=False,
            soft_wrap=True,
        )


def _mapping(result) -> str:
    return ", ".join(str(r) for r in result.match.rules) or "names kept as they are"


def _run(base_vlm: str, merged_text: str, out_path: str, prefix, kwargs: dict, quiet: bool):
    from ..fill_missing import fill_missing

    if quiet:
        return fill_missing(base_vlm, merged_text, out_path, prefix=prefix, **kwargs)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..progress import stderr_progress

    with stderr_progress(
        TextColumn("[bold]writing"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("write", total=None)
        return fill_missing(
            base_vlm,
            merged_text,
            out_path,
            prefix=prefix,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            **kwargs,
        )


if __name__ == "__main__":
    main()
