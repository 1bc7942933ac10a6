"""``mergekitty-extract-lora FINETUNED BASE OUT --rank R``: a LoRA adapter from a fine-tune.

The newer spelling ``--model FT --base-model BASE --out-path OUT`` works too.
"""

from __future__ import annotations

import shlex
import sys

import rich_click as click

from .options import command, legacy_options, messages_panel, note_legacy, opt, panel
from .shell import command_shell
from .verbosity import Verbosity

EXTRACT_LEGACY = ["lazy_unpickle"]


def _pick(positional: str | None, option: str | None, what: str, flag: str) -> str:
    if positional and option and positional != option:
        raise click.UsageError(f"the {what} is given twice, as '{positional}' and {flag} '{option}'")
    value = positional or option
    if not value:
        raise click.UsageError(f"missing the {what} (positional argument or {flag})")
    return value


def _command_line(out_path: str) -> str:
    """The invocation, for the adapter's README, without the output path (it may be private)."""
    args = [a for a in sys.argv[1:] if a != out_path and not a.startswith("--out-path=")]
    if "--out-path" in args:
        i = args.index("--out-path")
        del args[i : i + 1]
    return " ".join(["mergekitty-extract-lora", *map(shlex.quote, args)])


@command(legacy=EXTRACT_LEGACY)
@click.argument("finetuned_model", required=False)
@click.argument("base_model", required=False)
@click.argument("out_path", required=False)
@panel(
    "Models",
    [
        opt("model_opt", "--model", default=None, help="The fine-tuned model (same as FINETUNED_MODEL)."),
        opt("base_opt", "--base-model", default=None, help="The base model (same as BASE_MODEL)."),
        opt("out_opt", "--out-path", default=None, help="Where to write the adapter (same as OUT_PATH)."),
        opt("trust_remote_code", "--trust-remote-code/--no-trust-remote-code", default=False, show_default=True,
            help="Allow custom model code (used to find module types)."),
        "transformers_cache",
    ],
)  # fmt: skip
@panel(
    "Rank",
    [
        opt("rank", "-r", "--rank", "--max-rank", type=int, default=32, show_default=True,
            help="Largest LoRA rank of any module."),
        opt("sv_epsilon", "--sv-epsilon", type=float, default=0.0, show_default=True,
            help="Adaptive rank: drop singular values at or below this (absolute) value."),
        opt("energy", "--energy", type=float, default=None,
            help="Adaptive rank: the smallest rank keeping this fraction (0-1] of each difference's squared Frobenius norm."),
        opt("distribute_scale", "--distribute-scale/--no-distribute-scale", default=True, show_default=True,
            help="Split the singular values between A and B (sqrt on each side), or put them all in A."),
        opt("device", "--device", default="auto", show_default=True, help="Device for the SVDs: cpu, cuda, cuda:N or auto."),
    ],
)  # fmt: skip
@panel(
    "Modules",
    [
        opt("embed_lora", "--embed-lora/--no-embed-lora", default=False, show_default=True,
            help="Factor the embeddings and the head too, instead of saving them in full (modules_to_save)."),
        opt("extend_vocab", "--extend-vocab", is_flag=True, default=False,
            help="Keep the rows of tokens the fine-tune added (else they are dropped)."),
        opt("save_module", "--save-module", multiple=True,
            help="Save this module in full (modules_to_save); full name or last component; repeatable."),
        opt("include_regex", "-i", "--include-regex", multiple=True,
            help="Factor only modules matching one of these regexes; repeatable."),
        opt("exclude_regex", "-e", "--exclude-regex", multiple=True,
            help="Do not factor modules matching these regexes (they are saved in full if they changed); repeatable."),
        opt("skip_undecomposable", "--skip-undecomposable", is_flag=True, default=False,
            help="Leave out changed tensors that cannot be factored (norms...) instead of saving them in full."),
        opt("model_name", "--model-name", "--model_name", default=None, help="Title of the adapter's README."),
    ],
)  # fmt: skip
@messages_panel
@legacy_options(EXTRACT_LEGACY)
def main(finetuned_model, base_model, out_path, model_opt, base_opt, out_opt, quiet, verbose, **kwargs) -> None:
    """Extract a PEFT LoRA adapter that turns BASE_MODEL into (approximately) FINETUNED_MODEL,
    and write it to OUT_PATH."""
    verbosity = Verbosity.from_flags(quiet, verbose)
    finetuned = _pick(finetuned_model, model_opt, "fine-tuned model", "--model")
    base = _pick(base_model, base_opt, "base model", "--base-model")
    out = _pick(out_path, out_opt, "output path", "--out-path")
    with command_shell("no adapter was written; the output directory is as it was", verbosity) as console:
        note_legacy(kwargs, console, EXTRACT_LEGACY)
        from ..extras import require_torch
        from ..lora.extract import extract_lora

        require_torch("LoRA extraction")  # before the progress bar, which would leave a blank line

        kwargs["save_modules"] = kwargs.pop("save_module")
        kwargs["include"] = kwargs.pop("include_regex")
        kwargs["exclude"] = kwargs.pop("exclude_regex")
        if verbosity.quiet:
            result = extract_lora(finetuned, base, out, command=_command_line(out), **kwargs)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

            from ..progress import stderr_progress

            with stderr_progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("extracting", total=None)

                def progress(module: str, done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total, description=module)

                result = extract_lora(finetuned, base, out, command=_command_line(out), progress=progress, **kwargs)
        _summary(result, console)
        console.print(f"[green]done:[/] LoRA adapter written to {out}", highlight=False, soft_wrap=True)


def _summary(result, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    factored = result.factored
    cfg = result.adapter_config
    console.print(
        f"[bold]rank:[/] {cfg['r']}; modules factored: {len(factored)}; saved in full: {len(result.saved_in_full)}"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if not factored:
        return
    errors = [m.relative_error for m in factored]
    console.print(
        f"[bold]relative reconstruction error[/] ||dW - BA|| / ||dW||: mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}"
    )
    table = Table(title="largest errors")
    table.add_column("module")
    table.add_column("rank", justify="right")
    table.add_column("relative error", justify="right")
    for m in sorted(factored, key=lambda m: -m.relative_error)[:8]:
        table.add_row(escape(m.module), str(m.rank), f"{m.relative_error:.4g}")
    console.print(table)


if __name__ == "__main__":
    main()
