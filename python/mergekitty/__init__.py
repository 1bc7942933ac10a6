"""mergekitty: merge pretrained language models from a YAML config.

The heavy machinery (torch, transformers) is imported lazily so that
``import mergekitty`` and ``mergekitty-yaml --help`` stay fast.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = _metadata.version("mergekitty")
except _metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from .errors import (  # noqa: E402
    ArchitectureError,
    ConfigError,
    MergeError,
    MergekittyError,
    MissingExtraError,
    ModelFormatError,
    ModelNotFoundError,
    OutputError,
    PlanError,
)
from .extras import quiet_transformers_without_torch  # noqa: E402

if TYPE_CHECKING:
    from .api import MergeOptions

# before any part of mergekitty imports transformers, which logs it at import
quiet_transformers_without_torch()


def run_merge(config: Any, out_path: str, options: MergeOptions | None = None, **kwargs: Any) -> Any:
    """Run a merge. ``config`` is a MergeConfiguration, a YAML string, or a path to a YAML file.

    Keyword arguments are MergeOptions fields (``device``, ``threads``, ``out_shard_size``...).
    """
    from .api import run_merge as _run_merge

    return _run_merge(config, out_path, options=options, **kwargs)


# the rest of the Python API, imported when first used: name -> module
_LAZY = {
    "plan_merge": "api",
    "MergeOptions": "api",
    "extract_lora": "lora",
    "merge_lora": "lora",
    "plan_raw_merge": "raw_merge",
    "run_raw_merge": "raw_merge",
    "build_moe": "moe",
    "MoEOptions": "moe",
    "transplant": "tokensurgeon",
    "TokenSurgeonOptions": "tokensurgeon",
    "run_recipe": "recipe",
    "plan_recipe": "recipe",
    "load_recipe": "recipe",
    "shuffle_config": "layershuffle",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mergekitty' has no attribute {name!r}")


__all__ = [
    "MergeOptions",
    "MoEOptions",
    "TokenSurgeonOptions",
    "build_moe",
    "extract_lora",
    "merge_lora",
    "plan_merge",
    "plan_raw_merge",
    "run_raw_merge",
    "run_recipe",
    "plan_recipe",
    "load_recipe",
    "shuffle_config",
    "transplant",
    "ArchitectureError",
    "ConfigError",
    "MergeError",
    "MergekittyError",
    "MissingExtraError",
    "ModelFormatError",
    "ModelNotFoundError",
    "OutputError",
    "PlanError",
    "run_merge",
    "__version__",
]
