"""``mergekitty``: the command group (merge, plan, moe, extract-lora, merge-lora, layershuffle, mega,
multi, fill-missing, pytorch, tokensurgeon, inspect).

``moe``, ``extract-lora``, ``merge-lora``, ``layershuffle``, ``mega``, ``multi``, ``fill-missing``,
``pytorch`` and ``tokensurgeon`` are
also the ``mergekitty-<name>`` commands; here they are one entry point."""

from __future__ import annotations

import rich_click as click

from .extract_lora import main as extract_lora_command
from .fill_missing import main as fill_missing_command
from .inspect_cmd import main as inspect_command
from .layershuffle import main as layershuffle_command
from .merge_lora import main as merge_lora_command
from .moe import main as moe_command
from .options import HELP_CONFIG, MERGE_LEGACY, command, merge_options, plan_options
from .pytorch import main as pytorch_command
from .recipe import mega as mega_command
from .recipe import multi as multi_command
from .tokensurgeon import main as tokensurgeon_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.rich_config(help_config=HELP_CONFIG)
@click.version_option(package_name="mergekitty", message="mergekitty %(version)s")
def group() -> None:
    """Merge pretrained language models from a YAML config."""


@command(legacy=MERGE_LEGACY, device_aliases=True, version=False)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@merge_options
def merge(config_file: str, out_path: str, **kwargs) -> None:
    """Merge the models described by CONFIG_FILE and write the result to OUT_PATH."""
    from .run import run_command

    run_command(config_file, out_path, kwargs)


@command(version=False)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(), required=False)
@plan_options
def plan(config_file: str, out_path: str | None, json_path: str | None, **kwargs) -> None:
    """Print what merging CONFIG_FILE would do (layer map, kernels, output size, memory) without reading weights."""
    from .run import run_command

    run_command(config_file, out_path, kwargs, plan_only=True, json_path=json_path)


group.add_command(merge, "merge")
group.add_command(plan, "plan")
group.add_command(moe_command, "moe")
group.add_command(extract_lora_command, "extract-lora")
group.add_command(merge_lora_command, "merge-lora")
group.add_command(layershuffle_command, "layershuffle")
group.add_command(mega_command, "mega")
group.add_command(multi_command, "multi")
group.add_command(fill_missing_command, "fill-missing")
group.add_command(pytorch_command, "pytorch")
group.add_command(tokensurgeon_command, "tokensurgeon")
group.add_command(inspect_command, "inspect")


if __name__ == "__main__":
    group()
