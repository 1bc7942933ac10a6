"""``mergekitty-layershuffle OUT -m MODEL -w WEIGHT ...``: stack layers drawn at random from
several models (layershuffle.py builds the config), then merge it like any other config."""

from __future__ import annotations

from pathlib import Path

import rich_click as click

from .options import MERGE_LEGACY, command, merge_options, opt, panel

SHUFFLE_HELPS = {
    "random_seed": "Seed of the layer draw: the same models, weights and seed give the same config. "
    "[default: a fresh one, printed and written into the YAML]",
    "dry_run": "Build the config and check the merge (headers only; the plan is printed), but write no model.",
}


@command(legacy=MERGE_LEGACY, device_aliases=True)
@click.argument("out_path", type=click.Path())
@panel(
    "Layer shuffle",
    [
        opt("models", "-m", "--model", multiple=True, metavar="MODEL",
            help="A model to draw layers from (a directory or hub id; repeat for each model)."),
        opt("weights", "-w", "--weight", type=float, multiple=True, metavar="WEIGHT",
            help="The weight of each -m model, in the same order (none: equal weights). By position, "
            "the chance that a layer comes from the model; with --full-random, the fraction of its layers drawn."),
        opt("full_random", "--full-random", is_flag=True, default=False,
            help="Draw int(layers x weight) random layers of each model and shuffle them all, instead of "
            "choosing a model for each layer position."),
        opt("fp16", "--fp16", is_flag=True, default=False, help="Write the model in float16 (dtype: float16)."),
        opt("print_yaml", "--print-yaml", is_flag=True, default=False,
            help="Print the config on stdout (with --dry-run the plan then goes to stderr)."),
        opt("write_yaml", "--write-yaml", type=click.Path(dir_okay=False), default=None, metavar="PATH",
            help="Write the config to PATH."),
    ],
)  # fmt: skip
@merge_options(helps=SHUFFLE_HELPS, recipes=False)
def main(
    out_path: str,
    models: tuple[str, ...],
    weights: tuple[float, ...],
    full_random: bool,
    fp16: bool,
    print_yaml: bool,
    write_yaml: str | None,
    **kwargs,
) -> None:
    """Merge layers drawn at random from the -m models (weighted by -w) into OUT_PATH.

    Each output layer is a layer of one of the models: by position (layer i from one model's
    layer i), or with --full-random any layers in any order. Runs of consecutive layers of one
    model are one slice. The config is a passthrough merge; --print-yaml / --write-yaml keep it.
    """
    import secrets
    import sys

    from .options import build_options, take_verbosity
    from .run import INTERRUPTED, merge_loaded
    from .shell import command_shell

    verbosity = take_verbosity(kwargs)
    with command_shell(INTERRUPTED, verbosity) as console:
        seed = kwargs.pop("random_seed")
        options, dry_run = build_options(kwargs, console, MERGE_LEGACY)
        from ..api import layer_counts
        from ..config import load_config
        from ..layershuffle import check_weights, shuffle_config, shuffle_yaml

        check_weights(models, weights)  # before any model is opened
        counts = layer_counts(list(models), options)
        drawn = seed is None
        if seed is None:
            seed = secrets.randbits(31)
        data = shuffle_config(models, counts, weights, seed, full_random, "float16" if fp16 else None)
        text = shuffle_yaml(data, seed, full_random)
        if drawn:
            console.print(
                f"random seed: {seed} (pass --random-seed {seed} to draw the same layers again)",
                highlight=False,
                soft_wrap=True,
            )
        slices = data["slices"]
        layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices)
        console.print(
            f"{layers} layers in {len(slices)} slice(s) from {len(models)} model(s)", highlight=False, soft_wrap=True
        )
        if print_yaml:
            sys.stdout.write(text)
            sys.stdout.flush()
        if write_yaml is not None:
            _write_yaml(Path(write_yaml), text, [*models, out_path])
            console.print(f"config written to {write_yaml}", highlight=False, markup=False, soft_wrap=True)
        config = load_config(text, source=write_yaml or "<layer shuffle config>")
        merge_loaded(
            config,
            out_path,
            options,
            verbosity,
            console,
            plan_only=dry_run,
            plan_console=console if print_yaml else None,
        )


def _write_yaml(path: Path, text: str, directories: list[str]) -> None:
    """Write the config to ``path``, which must not be inside an input model or the output
    (``directories``): the file would replace one of theirs. Written whole or not at all."""
    import os

    from ..errors import OutputError

    target = Path(os.path.realpath(path.expanduser()))
    for d in directories:
        directory = Path(d).expanduser()
        if directory.is_dir() and Path(os.path.realpath(directory)) in target.parents:
            raise OutputError(f"--write-yaml {path} is inside {d}, a model of this merge or its output")
    temp = target.with_name(f".{target.name}.partial")
    try:
        temp.write_text(text)
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(f"cannot write --write-yaml {path}: {exc.strerror or exc}") from None


if __name__ == "__main__":
    main()
