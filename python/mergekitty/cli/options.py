"""The options of the commands, grouped into help panels, and what each command takes.

Each command lists in its ``--help`` only the options it uses. Options of older command lines
(mergekit's and the earlier mergekitty's) that mean nothing here are still accepted, so existing
scripts keep working: they are hidden, named once in the help's last line (``legacy_epilog``),
and say why they have no effect when given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import rich_click as click
from rich_click.rich_panel import RichOptionPanel

from .. import __version__
from .verbosity import Verbosity, verbosity_options

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
    "safe_serialization": "the output is always safetensors",
    "trust_remote_code": "no model code is run: only config.json, tokenizer files and tensors are read",
    # merge options merge-lora accepts (as every merge command did) without using them
    "threads": "applying an adapter runs in torch on --device",
    "allow_crimes": "there is one model",
    "random_seed": "applying an adapter draws no random numbers",
    "lora_merge_dtype": "each changed tensor is computed in float32 and rounded to the base tensor's dtype",
    # mergekitty-moe
    "load_in_4bit": "the base model runs unquantized",
    "load_in_8bit": "the base model runs unquantized",
    # tokensurgeon
    "device": "the approximation runs in numpy on the CPU",
}

# merge options a raw merge (mergekitty pytorch) accepts, as mergekit's did, without using them
RAW_NO_EFFECT = {
    "copy_tokenizer": "a raw merge writes no tokenizer",
    "write_model_card": "a raw merge writes no model card; its config is kept as mergekitty_config.yml",
    "allow_crimes": "a raw merge has no architectures to compare",
    "lora_merge_dtype": "a raw merge takes no LoRA adapters",
    "transformers_cache": "a raw merge reads local files only",
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


class _WholeNamesPanel(RichOptionPanel):
    """An option panel whose name columns never wrap: on a narrow terminal the help column
    shrinks instead, so option names are never broken in the middle."""

    def get_table(self, command, ctx, formatter):
        table = super().get_table(command, ctx, formatter)
        for column in table.columns:  # the columns of names are headed "Opt Long", "Opt Short"...
            if str(column.header).startswith("Opt"):
                column.no_wrap = True
        return table


# Long names are joined by ", " and the negative form of a flag goes on its own line (names break
# only between names); the help of every command ends with the old options it accepts (the
# epilog) and this project's name and version.
HELP_CONFIG = click.RichHelpConfiguration(
    delimiter_comma=", ", delimiter_slash="\n", footer_text=f"mergekitty {__version__}"
)

# name -> click.option arguments (the parameter name is the dict key)
_OPTION: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "device": (
        ("--device",),
        {"default": None, "help": "Device for the merge arithmetic: cpu, cuda, cuda:N or auto. [default: cpu]"},
    ),
    "threads": (
        ("-j", "--threads", "--num-threads"),
        {
            "type": int,
            "default": 0,
            "help": "CPU threads for the native kernels and torch; 0 uses every core. [default: 0]",
        },
    ),
    "out_shard_size": (
        ("--out-shard-size",),
        {
            "type": SizeType(),
            "default": "5B",
            "help": "Largest size of each output shard in BYTES (5B = five billion bytes, 500M, 1.5G, 512MiB; 0 = one shard). [default: 5B]",
        },
    ),
    "copy_tokenizer": (
        ("--copy-tokenizer/--no-copy-tokenizer",),
        {"default": True, "show_default": True, "help": "Write the tokenizer of the base (or first) model."},
    ),
    "write_model_card": (
        ("--write-model-card/--no-write-model-card",),
        {"default": True, "show_default": True, "help": "Write README.md and mergekitty_config.yml."},
    ),
    "dry_run": (
        ("--dry-run",),
        {
            "is_flag": True,
            "default": False,
            "help": "Check everything, print what would be written on stdout, and read no weights.",
        },
    ),
    "allow_nonfinite": (
        ("--allow-nonfinite",),
        {
            "is_flag": True,
            "default": False,
            "help": "Write merged tensors that hold NaN or Inf (and report them) instead of stopping with an error.",
        },
    ),
    "health_json": (
        ("--json",),
        {
            "is_flag": True,
            "default": False,
            "help": "Also write the health report (NaN/Inf found, norms, the seed) as mergekitty_health.json next to the model.",
        },
    ),
    "strict": (
        ("--strict",),
        {
            "is_flag": True,
            "default": False,
            "help": "Config keys and method parameters the merge does not read are errors, not warnings.",
        },
    ),
    "allow_crimes": (
        ("--allow-crimes/--no-allow-crimes",),
        {"default": False, "show_default": True, "help": "Allow merging models of different architectures."},
    ),
    "layout_override": (
        ("--layout-override",),
        {
            "type": click.Path(dir_okay=False),
            "default": None,
            "help": "A layout file (JSON/YAML) stating the layer stack of models whose tensor names are not understood; see README 'Model layouts'.",
        },
    ),
    "random_seed": (
        ("--random-seed",),
        {"type": int, "default": None, "help": "Seed for random merge methods; recorded in the model card."},
    ),
    "lora_merge_dtype": (
        ("--lora-merge-dtype",),
        {
            "type": click.Choice(["bfloat16", "float16", "float32"]),
            "metavar": "DTYPE",
            "default": None,
            "help": "bfloat16, float16 or float32: the dtype the tensors a model+lora adapter changes are rounded to before merging. [default: the base tensor's dtype]",
        },
    ),
    "write_intermediates": (
        ("--write-intermediates",),
        {
            "type": click.Path(file_okay=False),
            "metavar": "DIR",
            "default": None,
            "help": "For a recipe (several YAML documents): also write each intermediate merge to DIR/<name>. "
            "Without it they are computed in memory as the next merge reads them, and never written.",
        },
    ),
    "transformers_cache": (
        ("--transformers-cache",),
        {"default": None, "help": "Cache directory for models downloaded from the hub."},
    ),
}

# accepted old spellings of --device: (option arguments, what it means)
_DEVICE_ALIASES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "cuda": (("--cuda/--no-cuda",), {"default": False}),
    "compute_device": (("--compute-device",), {"default": None}),
    "gpu_rich": (("--gpu-rich",), {"is_flag": True, "default": False}),
}

# the no-op options' click arguments
_LEGACY: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "lazy_unpickle": (("--lazy-unpickle/--no-lazy-unpickle",), {"default": None}),
    "clone_tensors": (("--clone-tensors/--no-clone-tensors",), {"default": None}),
    "low_cpu_memory": (("--low-cpu-memory",), {"is_flag": True, "default": None}),
    "read_to_gpu": (("--read-to-gpu",), {"is_flag": True, "default": None}),
    "load_to_compute": (("--load-to-compute/--no-load-to-compute",), {"default": None}),
    "storage_device": (("--storage-device",), {"default": None}),
    "multi_gpu": (("--multi-gpu",), {"is_flag": True, "default": None}),
    "async_write": (("--async-write/--no-async-write",), {"default": None}),
    "write_threads": (("--write-threads",), {"type": int, "default": None}),
    "executor": (("--executor",), {"default": None}),
    "lora_merge_cache": (("--lora-merge-cache",), {"default": None}),
    "safe_serialization": (("--safe-serialization/--no-safe-serialization",), {"default": None}),
    "trust_remote_code": (("--trust-remote-code/--no-trust-remote-code",), {"default": None}),
    "threads": (("-j", "--threads", "--num-threads"), {"type": int, "default": None}),
    "allow_crimes": (("--allow-crimes/--no-allow-crimes",), {"default": None}),
    "random_seed": (("--random-seed",), {"type": int, "default": None}),
    "lora_merge_dtype": (("--lora-merge-dtype",), {"default": None}),
    "load_in_4bit": (("--load-in-4bit",), {"is_flag": True, "default": None}),
    "load_in_8bit": (("--load-in-8bit",), {"is_flag": True, "default": None}),
    "copy_tokenizer": (("--copy-tokenizer/--no-copy-tokenizer",), {"default": None}),
    "write_model_card": (("--write-model-card/--no-write-model-card",), {"default": None}),
    "transformers_cache": (("--transformers-cache",), {"default": None}),
    "device": (("--device",), {"default": None}),
}


def _option(name: str, decls: tuple[str, ...], attrs: dict[str, Any]) -> Callable:
    return click.option(*decls, name, **attrs)


def _apply(fn, decorators: list[Callable]):
    return functools.reduce(lambda f, o: o(f), reversed(decorators), fn)


def opt(name: str, *decls: str, **attrs: Any) -> tuple[str, Callable]:
    """An option of one command, for ``panel``: its parameter name and its click decorator."""
    return name, click.option(*decls, name, **attrs)


def panel(title: str, items: list[str | tuple[str, Callable]], helps: dict[str, str] | None = None) -> Callable:
    """Add options to a command, shown together under ``title`` in its help. An item is the name
    of a shared option (a key of ``_OPTION``) or an ``opt(...)``; ``helps`` replaces the help
    text of shared options for a command that gives them another meaning."""
    helps = helps or {}

    def shared(name: str) -> Callable:
        decls, attrs = _OPTION[name]
        return _option(name, decls, {**attrs, "help": helps[name]} if name in helps else attrs)

    pairs = [(item, shared(item)) if isinstance(item, str) else item for item in items]

    def decorate(fn):
        fn = _apply(fn, [d for _, d in pairs])
        return click.option_panel(title, cls=_WholeNamesPanel, options=[n for n, _ in pairs])(fn)

    return decorate


def _hidden(names: list[str], table: dict[str, tuple[tuple[str, ...], dict[str, Any]]]) -> Callable:
    """Accept the options ``names`` of ``table`` without listing them in the help."""
    return lambda fn: _apply(fn, [click.option(*table[n][0], n, hidden=True, **table[n][1]) for n in names])


def legacy_options(names: list[str]) -> Callable:
    """Accept the no-op options ``names`` (keys of ``NO_EFFECT``) without listing them one by one;
    ``command(legacy=names)`` names them in the help's last line."""
    return _hidden(names, _LEGACY)


def spelled(names: list[str], table: dict[str, tuple[tuple[str, ...], dict[str, Any]]]) -> str:
    """The options ``names`` of ``table`` as the user would type them: ``--a, --no-a, --b``."""
    flags = []
    for n in names:
        for decl in table[n][0]:
            if decl.startswith("--") and "/" in decl:  # --x/--no-x
                flags.append("--[no-]" + decl.split("/")[0][2:])
            elif decl.startswith("--"):
                flags.append(decl)
    return ", ".join(flags)


def legacy_epilog(legacy: list[str], device_aliases: bool) -> str:
    """The help's last line: the old options accepted so that existing command lines still run."""
    parts = []
    if device_aliases:
        parts.append(f"{spelled(list(_DEVICE_ALIASES), _DEVICE_ALIASES)}: old spellings of --device.")
    if legacy:
        parts.append(f"Accepted and ignored (older command lines): {spelled(legacy, _LEGACY)}.")
    return " ".join(parts)


def messages_panel(fn=None, *, verbose_help: str | None = None):
    """-q and -v, under "Messages"; ``verbose_help`` says what -v adds for this command."""

    def decorate(fn):
        fn = verbosity_options(fn, verbose_help)
        return click.option_panel("Messages", cls=_WholeNamesPanel, options=["quiet", "verbose"])(fn)

    return decorate(fn) if fn is not None else decorate


def command(
    legacy: Sequence[str] = (), device_aliases: bool = False, version: bool = True, epilog: str = "", **attrs
) -> Callable:
    """``click.command`` with what every command shares: ``-h``, ``--version``, the help layout,
    and a last help line naming the accepted old options (``legacy``, and the old spellings of
    --device with ``device_aliases``)."""
    last_line = " ".join(filter(None, [epilog, legacy_epilog(list(legacy), device_aliases)])) or None

    def decorate(fn):
        if version:
            fn = click.version_option(package_name="mergekitty", message="mergekitty %(version)s")(fn)
        fn = click.rich_config(help_config=HELP_CONFIG)(fn)
        return click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=last_line, **attrs)(fn)

    return decorate


MERGE_VERBOSE_HELP = "-v: the plan summary before the merge, each phase's time and bytes after it; -vv: also every tensor's kernel and time."

# the merge commands (merge, mergekitty-yaml): every option below is used
MERGE_LEGACY = [
    "lazy_unpickle",
    "clone_tensors",
    "low_cpu_memory",
    "read_to_gpu",
    "load_to_compute",
    "storage_device",
    "multi_gpu",
    "async_write",
    "write_threads",
    "executor",
    "lora_merge_cache",
    "safe_serialization",
    "trust_remote_code",
]


def merge_options(fn=None, *, helps: dict[str, str] | None = None, recipes: bool = True):
    """The options of ``mergekitty merge`` and ``mergekitty-yaml``; they arrive as keyword arguments.
    ``helps``: other help texts for some of them (a command that builds its own config);
    ``recipes``: whether the command runs recipes (--write-intermediates)."""
    if fn is None:
        return functools.partial(merge_options, helps=helps, recipes=recipes)
    for deco in reversed(
        [
            panel("Compute", ["device", "threads"], helps),
            panel(
                "Inputs",
                ["strict", "allow_crimes", "layout_override", "random_seed", "lora_merge_dtype", "transformers_cache"],
                helps,
            ),
            panel(
                "Output",
                [
                    "out_shard_size",
                    "copy_tokenizer",
                    "write_model_card",
                    "allow_nonfinite",
                    "health_json",
                    *(["write_intermediates"] if recipes else []),
                    "dry_run",
                ],
                helps,
            ),
            messages_panel(verbose_help=MERGE_VERBOSE_HELP),
            _hidden(list(_DEVICE_ALIASES), _DEVICE_ALIASES),
            legacy_options(MERGE_LEGACY),
            click.option("--unsafe-truncate-embeddings", is_flag=True, default=False, hidden=True),
        ]
    ):
        fn = deco(fn)
    return fn


def plan_options(fn):
    """The options of ``mergekitty plan``: those that change the plan, and the messages."""
    for deco in reversed(
        [
            panel("Compute", ["device"]),
            panel(
                "Inputs",
                ["strict", "allow_crimes", "layout_override", "random_seed", "lora_merge_dtype", "transformers_cache"],
            ),
            panel(
                "Output",
                [
                    "out_shard_size",
                    opt(
                        "json_path",
                        "--json",
                        type=click.Path(dir_okay=False, allow_dash=True),
                        default=None,
                        help="Also write the plan as JSON to this file ('-': on stdout, instead of the table): "
                        "every tensor's sources, parameters, kernel, shard and offset.",
                    ),
                ],
            ),
            messages_panel,
        ]
    ):
        fn = deco(fn)
    return fn


# merge-lora took every merge option; those it has no use for are accepted and ignored
MERGE_LORA_LEGACY = [*MERGE_LEGACY, "threads", "allow_crimes", "random_seed", "lora_merge_dtype"]


def merge_lora_options(fn):
    for deco in reversed(
        [
            panel("Compute", ["device"]),
            panel("Inputs", ["transformers_cache"]),
            panel("Output", ["out_shard_size", "copy_tokenizer", "write_model_card", "dry_run"]),
            messages_panel,
            _hidden(list(_DEVICE_ALIASES), _DEVICE_ALIASES),
            legacy_options(MERGE_LORA_LEGACY),
        ]
    ):
        fn = deco(fn)
    return fn


# the raw merge command: the merge options that mean something without a config.json or tokenizer
RAW_LEGACY = [*MERGE_LEGACY, *RAW_NO_EFFECT]


def raw_merge_options(fn):
    """The options of ``mergekitty pytorch``: the merge options but those about tokenizers,
    model cards, architectures and downloads (accepted and ignored, as ``RAW_LEGACY``)."""
    for deco in reversed(
        [
            panel(
                "Tensors",
                [
                    opt(
                        "tensor_intersection",
                        "-i",
                        "--tensor-intersection",
                        is_flag=True,
                        default=False,
                        help="Merge only the tensors every model has; leave out the others.",
                    ),
                    opt(
                        "tensor_union",
                        "-u",
                        "--tensor-union",
                        is_flag=True,
                        default=False,
                        help="Merge every tensor from the models that have it. [default: a tensor some models lack is an error]",
                    ),
                ],
            ),
            panel("Compute", ["device", "threads"]),
            panel("Inputs", ["strict", "random_seed"]),
            panel("Output", ["out_shard_size", "allow_nonfinite", "health_json", "dry_run"]),
            messages_panel(verbose_help=MERGE_VERBOSE_HELP),
            _hidden(list(_DEVICE_ALIASES), _DEVICE_ALIASES),
            legacy_options(RAW_LEGACY),
        ]
    ):
        fn = deco(fn)
    return fn


def build_options(kwargs: dict, console, legacy: list[str], reasons: dict[str, str] | None = None) -> tuple:
    """Turn the CLI keyword arguments into (MergeOptions, dry_run), with a note for each option of
    ``legacy`` given (they have no effect: ``reasons`` says why where NO_EFFECT does not)."""
    from ..api import MergeOptions

    note_legacy(kwargs, console, legacy, reasons)
    if kwargs.pop("unsafe_truncate_embeddings", False):
        raise click.UsageError("--unsafe-truncate-embeddings is not supported")
    device = kwargs.pop("device", None) or kwargs.pop("compute_device", None)
    kwargs.pop("compute_device", None)
    if kwargs.pop("cuda", False) or kwargs.pop("gpu_rich", False):
        device = device or "cuda"
    kwargs.pop("gpu_rich", None)
    dry_run = kwargs.pop("dry_run", False)
    return MergeOptions(device=device or "cpu", **kwargs), dry_run


def note_legacy(kwargs: dict, console, legacy: list[str], reasons: dict[str, str] | None = None) -> None:
    """Take the options of ``legacy`` out of ``kwargs``, with a note for each one given: it has no
    effect. (``--no-lazy-unpickle`` and ``--safe-serialization`` ask for what happens anyway.)"""
    for name in legacy:
        value = kwargs.pop(name, None)
        if value is None or value is (name == "safe_serialization"):
            continue
        flag = _LEGACY[name][0][0].split("/")[0 if value is not False else 1]
        reason = (reasons or {}).get(name) or NO_EFFECT[name]
        console.print(f"[yellow]note:[/] {flag} has no effect: {reason}", highlight=False, soft_wrap=True)


def take_verbosity(kwargs: dict) -> Verbosity:
    """The verbosity of ``-q``/``-v``, taken out of the command's keyword arguments."""
    return Verbosity.from_flags(kwargs.pop("quiet", False), kwargs.pop("verbose", 0))
