"""``mergekitty-tokensurgeon MODEL DONOR OUT``: MODEL with DONOR's tokenizer.

Both older command lines are understood: mergekit's (``-a omp``, ``-k 64``, ``-w``, ``--batch-size``)
and the earlier mergekitty's (k nearest neighbours, ``-b``, ``-c``). Their options for methods not
offered here are refused with one line saying so.
"""

from __future__ import annotations

from typing import Any

import rich_click as click

from .options import MERGE_LEGACY, command, legacy_options, messages_panel, note_legacy, opt, panel
from .shell import command_shell
from .verbosity import Verbosity

# the merge command's old options, and --device: the transplant is numpy on CPU
TOKENSURGEON_LEGACY = [*MERGE_LEGACY, "device"]
# mergekit's name of the k-nearest-neighbour method
METHOD_ALIASES = {"common_interpolation": "knn"}
# mergekit's approximation methods that are not offered here
OTHER_METHODS = ("subword", "mean", "zero", "randn", "john_hewitt", "landmark_pca", "stb", "mp_rope")

# mergekit's options for what this command does not do: parameter -> (option names, click arguments, why)
UNSUPPORTED: dict[str, tuple[tuple[str, ...], dict[str, Any], str]] = {
    "subword_method": (("-s", "--subword-method"), {}, "new tokens are approximated by omp or knn (-a)"),
    "prefix_match": (("-pm", "--prefix-match"), {}, "a new token's row never comes from a token it starts with"),
    "byte_match": (("-bm", "--byte-match"), {}, "byte pieces (<0xXX>) always match single-byte tokens"),
    "magikarp": (("--magikarp",), {"is_flag": True, "default": None}, "no token is filtered out as under-trained"),
    "new_vocab_noise": (("-nvn", "--new-vocab-noise"), {"type": float}, "approximated rows get no noise"),
    "new_vocab_scale": (("-nvs", "--new-vocab-scale"), {"type": float}, "approximated rows are not rescaled"),
}


def _unsupported_options(fn):
    for name, (decls, attrs, _) in UNSUPPORTED.items():
        fn = click.option(*decls, name, hidden=True, **{"default": None, **attrs})(fn)
    return fn


def _method_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The approximation settings of the command line, as TokenSurgeonOptions fields; one
    InvalidArgumentError for what cannot be honoured."""
    from ..errors import InvalidArgumentError
    from ..tokensurgeon.approximate import METHODS, WEIGHT_SCHEMES

    for name, (decls, _, why) in UNSUPPORTED.items():
        if kwargs.pop(name) is not None:
            raise InvalidArgumentError(f"{'/'.join(decls)} is not supported by mergekitty tokensurgeon: {why}")
    given = kwargs.pop("approximation_method")
    method = METHOD_ALIASES.get(given or "omp", given or "omp")
    if method not in METHODS:
        hint = " (mergekit's method, not offered here)" if method in OTHER_METHODS else ""
        raise InvalidArgumentError(
            f"-a/--approximation-method {method}{hint}: choose omp or knn (also spelled common_interpolation)"
        )
    scheme, barycentric, cosine = kwargs.pop("weight_scheme"), kwargs.pop("barycentric"), kwargs.pop("cosine")
    if scheme is not None and scheme not in WEIGHT_SCHEMES:
        raise InvalidArgumentError(f"-w/--weight-scheme {scheme}: choose one of {', '.join(WEIGHT_SCHEMES)}")
    if barycentric and scheme not in (None, "barycentric"):
        raise InvalidArgumentError(f"-b/--barycentric and -w/--weight-scheme {scheme} contradict each other")
    if method == "omp":
        for flag, value in (("-w/--weight-scheme", scheme), ("-b/--barycentric", barycentric or None),
                            ("-c/--cosine-similarity", cosine or None)):  # fmt: skip
            if value is not None:
                raise InvalidArgumentError(
                    f"{flag} weights the nearest neighbours of -a knn; omp (the default) fits its weights by least squares"
                )
    return {
        "method": method,
        "k": kwargs.pop("k"),
        "cosine": bool(cosine),
        "weight_scheme": "barycentric" if barycentric else scheme or "distance_proportional",
        "batch_size": kwargs.pop("batch_size"),
    }


@command(legacy=TOKENSURGEON_LEGACY)
@click.argument("model")
@click.argument("donor")
@click.argument("out_path", type=click.Path())
@panel(
    "Approximation",
    [
        opt("approximation_method", "-a", "--approximation-method", default=None, metavar="METHOD",
            help="How rows of donor tokens the model lacks are built from the tokens both share: omp "
            "(orthogonal matching pursuit) or knn (k nearest neighbours). [default: omp]"),
        opt("k", "-k", "--k", type=click.IntRange(min=1), default=None,
            help="Shared tokens per new token: atoms of omp, neighbours of knn. [default: 64 for omp, 8 for knn]"),
        opt("weight_scheme", "-w", "--weight-scheme", default=None, metavar="SCHEME",
            help="knn: how the neighbours are weighted: distance_proportional (softmin of the distance), "
            "barycentric (least squares, weights summing to 1) or least_squares. [default: distance_proportional]"),
        opt("barycentric", "-b/-nb", "--barycentric/--no-barycentric", default=None,
            help="knn: the same as -w barycentric."),
        opt("cosine", "-c/-nc", "--cosine-similarity/--no-cosine-similarity", default=None,
            help="knn: nearest by cosine distance instead of euclidean."),
        opt("batch_size", "--batch-size", type=int, default=512, show_default=True,
            help="New tokens approximated at a time (-1: as many as memory allows)."),
    ],
)  # fmt: skip
@panel(
    "Inputs",
    [
        opt("allow_crimes", "--allow-crimes/--no-allow-crimes", default=False, show_default=True,
            help="Allow a donor of another architecture."),
        "transformers_cache",
    ],
)  # fmt: skip
@panel("Output", ["out_shard_size"])
@messages_panel(verbose_help="-v: also the first new tokens and the matching details.")
@legacy_options(TOKENSURGEON_LEGACY)
@_unsupported_options
def main(model: str, donor: str, out_path: str, quiet: bool, verbose: int, **kwargs) -> None:
    """Write MODEL with the tokenizer of DONOR to OUT_PATH.

    Donor tokens MODEL also has keep MODEL's rows; the others are approximated from the tokens
    both share, with weights fitted in DONOR's embeddings (see README 'Tokenizer transplant').
    """
    verbosity = Verbosity.from_flags(quiet, verbose)
    with command_shell("no model was written; the output directory is as it was", verbosity) as console:
        note_legacy(kwargs, console, TOKENSURGEON_LEGACY)
        settings = _method_options(kwargs)
        from ..tokensurgeon import TokenSurgeonOptions, transplant

        options = TokenSurgeonOptions(**settings, **kwargs)
        if verbosity.quiet:
            result = transplant(model, donor, out_path, options)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

            from ..progress import stderr_progress

            with stderr_progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                console=console, transient=True,
            ) as bar:  # fmt: skip
                task = bar.add_task("reading", total=None)

                def progress(stage: str, done: int, total: int) -> None:
                    bar.update(task, description=stage, completed=done, total=total)

                result = transplant(model, donor, out_path, options, progress=progress)
        _summary(result, console)
        console.print(f"[green]done:[/] the model with the donor's tokenizer written to {out_path}",
                      highlight=False, soft_wrap=True)  # fmt: skip


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _summary(result, console) -> None:
    m = result.match
    console.print(
        f"[bold]donor vocabulary:[/] {result.vocab_size} rows; copied {m.copied.size} "
        f"({m.exact} same text, {m.bytes} byte pieces, {m.special} by role); approximated {m.new.size} "
        f"by {result.method} (k={result.k}); padding rows {m.padding.size}",
        highlight=False,
        soft_wrap=True,
    )
    for r in result.matrices:
        if not r.new_rows:
            continue
        heldout = (
            f"; held-out shared tokens ({r.heldout}): relative error {_figure(r.heldout_error)} "
            f"(mean row: {_figure(r.mean_row_error)})"
            if r.heldout
            else ""
        )
        console.print(
            f"[bold]reconstruction[/] {r.tensor}: fit in the donor's {r.space}: relative error "
            f"{_figure(r.fit_error)}{heldout}",
            highlight=False,
            soft_wrap=True,
        )


if __name__ == "__main__":
    main()
