"""The merge options shared by ``mergekitty-yaml`` and ``mergekitty merge/plan``.

Options of the older tools that no longer mean anything here are still accepted
(so existing scripts keep working) and say why they have no effect.
"""

from __future__ import annotations

import functools

import rich_click as click

# option -> why it has no effect
NO_EFFECT = {
    "lazy_unpickle": "pytorch_model*.bin files are always read with torch.load(weights_only=True, mmap=True)",
    "clone_tensors": "tensors are written straight to their place in the output file; nothing is shared",
    "low_cpu_memory": "inputs are streamed from memory maps; there is no intermediate storage device",
    "read_to_gpu": "each job's inputs are moved to --device as they are used",
    "load_to_compute": "each job's inputs are moved to --device as they are used",
    "storage_device": "results are written as soon as they are computed",
    "multi_gpu": "one device runs the merge",
    "async_write": "writes always happen on a background thread, overlapped with compute",
    "write_threads": "writes always happen on one background thread",
    "executor": "the streaming executor is the only one",
    "lora_merge_cache": "model+lora adapters are applied tensor by tensor while streaming; nothing is cached",
}


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        from ..sizes import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def merge_options(fn):
    """Decorate a click command with every merge option; they arrive as keyword arguments."""
    opts = [
        click.option(
            "--device", default=None, help="Device for the merge arithmetic: cpu, cuda, cuda:N or auto. [default: cpu]"
        ),
        click.option("--cuda/--no-cuda", default=False, help="Same as --device cuda."),
        click.option("--compute-device", default=None, help="Same as --device (mergekitty 0.3 spelling)."),
        click.option("--gpu-rich", is_flag=True, default=False, help="Same as --device cuda."),
        click.option(
            "-j",
            "--threads",
            "--num-threads",
            "threads",
            type=int,
            default=0,
            help="CPU threads for the native kernels and torch; 0 uses every core. [default: 0]",
        ),
        click.option(
            "--out-shard-size",
            type=SizeType(),
            default="5B",
            help="Maximum size of each output shard in BYTES (5B = five billion bytes, 500M, 1.5G, 512MiB; 0 = one shard). [default: 5B]",
        ),
        click.option(
            "--copy-tokenizer/--no-copy-tokenizer",
            default=True,
            show_default=True,
            help="Copy the tokenizer files of the base (or first) model.",
        ),
        click.option(
            "--write-model-card/--no-write-model-card",
            default=True,
            show_default=True,
            help="Write README.md and mergekitty_config.yml.",
        ),
        click.option(
            "--strict",
            is_flag=True,
            default=False,
            help="Config keys and method parameters the merge does not read (which mergekit ignores silently, and "
            "this tool with a warning) are errors.",
        ),
        click.option(
            "--allow-crimes/--no-allow-crimes",
            default=False,
            show_default=True,
            help="Allow merging models of different architectures.",
        ),
        click.option(
            "--layout-override",
            type=click.Path(dir_okay=False),
            default=None,
            help="A layout file (JSON/YAML) stating the layer stack of models whose tensor names are not understood; see README 'Model layouts'.",
        ),
        click.option(
            "--trust-remote-code/--no-trust-remote-code",
            default=False,
            show_default=True,
            help="Allow custom model code from the hub where configs need it.",
        ),
        click.option(
            "--random-seed", type=int, default=None, help="Seed for random merge methods; recorded in the model card."
        ),
        click.option("--transformers-cache", default=None, help="Cache directory for models downloaded from the hub."),
        click.option(
            "--lora-merge-cache",
            default=None,
            help="No effect (kept for compatibility): model+lora adapters are applied tensor by tensor while streaming; nothing is cached.",
        ),
        click.option(
            "--lora-merge-dtype",
            type=click.Choice(["bfloat16", "float16", "float32"]),
            default=None,
            help="dtype the tensors a model+lora adapter changes are rounded to before merging. [default: the base tensor's dtype]",
        ),
        click.option("--quiet/--no-quiet", default=False, show_default=True, help="No progress bar."),
        click.option(
            "--dry-run",
            is_flag=True,
            default=False,
            help="Print the plan (layer map, sizes, memory estimate) and read no weights.",
        ),
        click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug)."),
        click.option(
            "--safe-serialization/--no-safe-serialization",
            default=True,
            show_default=True,
            help="Output is always safetensors; --no-safe-serialization is ignored.",
        ),
        click.option("--unsafe-truncate-embeddings", is_flag=True, default=False, hidden=True),
        # no effect here, accepted for existing scripts
        click.option("--lazy-unpickle/--no-lazy-unpickle", default=None, help="No effect (kept for compatibility)."),
        click.option("--clone-tensors/--no-clone-tensors", default=None, help="No effect (kept for compatibility)."),
        click.option("--low-cpu-memory", is_flag=True, default=None, help="No effect (kept for compatibility)."),
        click.option("--read-to-gpu", is_flag=True, default=None, help="No effect (kept for compatibility)."),
        click.option(
            "--load-to-compute/--no-load-to-compute", default=None, help="No effect (kept for compatibility)."
        ),
        click.option("--storage-device", default=None, help="No effect (kept for compatibility)."),
        click.option("--multi-gpu", is_flag=True, default=None, help="No effect (kept for compatibility)."),
        click.option("--async-write/--no-async-write", default=None, help="No effect (kept for compatibility)."),
        click.option("--write-threads", type=int, default=None, help="No effect (kept for compatibility)."),
        click.option("--executor", default=None, help="No effect (kept for compatibility)."),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def health_options(fn):
    """The health report's options, for the commands that write a merged model."""
    opts = [
        click.option(
            "--allow-nonfinite",
            is_flag=True,
            default=False,
            help="Write merged tensors that hold NaN or Inf (and report them) instead of stopping with an error.",
        ),
        click.option(
            "--json",
            "health_json",
            is_flag=True,
            default=False,
            help="Also write the health report (NaN/Inf found, norms, the seed) as mergekitty_health.json next to the model.",
        ),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def build_options(kwargs: dict, console) -> tuple:
    """Turn the CLI keyword arguments into (MergeOptions, dry_run), printing notes for no-op options."""
    from ..api import MergeOptions
    from .shell import setup_logging

    setup_logging(kwargs.pop("verbose", 0))
    for name, why in NO_EFFECT.items():
        if kwargs.pop(name, None) not in (None, False):
            console.print(f"[yellow]note:[/] --{name.replace('_', '-')} has no effect: {why}")
    if not kwargs.pop("safe_serialization", True):
        console.print("[yellow]note:[/] --no-safe-serialization has no effect: output is always safetensors")
    if kwargs.pop("unsafe_truncate_embeddings", False):
        raise click.UsageError("--unsafe-truncate-embeddings is not supported")
    device = kwargs.pop("device", None) or kwargs.pop("compute_device", None)
    kwargs.pop("compute_device", None)
    if kwargs.pop("cuda", False) or kwargs.pop("gpu_rich", False):
        device = device or "cuda"
    kwargs.pop("gpu_rich", None)
    dry_run = kwargs.pop("dry_run", False)
    return MergeOptions(device=device or "cpu", **kwargs), dry_run
