"""The values of a model's ``config.json`` that mergekitty reads, checked once where it is read.

Planning compares ``architectures`` and ``model_type``, finds the layer count, and rewrites the
per-layer settings and ``vocab_size`` of the output config; LoRA extraction reads
``tie_word_embeddings``. A value of the wrong type there would be a TypeError deep inside, or
worse, read as something else (``bool("false")`` is True). Every other key is copied as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError
from ..io.model_files import shown
from .layout import LAYER_COUNT_KEYS, TEXT_CONFIG_KEYS


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _indices(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v, 0) for v in value)


# key -> (what it must be, for the message; the check). null (None) is accepted for every key.
_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "architectures": ("a list of class names (strings)", _strings),
    "model_type": ("a string", lambda v: isinstance(v, str)),
    **{k: ("a non-negative integer", lambda v: _is_int(v, 0)) for k in LAYER_COUNT_KEYS},
    "vocab_size": ("a positive integer", lambda v: _is_int(v, 1)),
    "tie_word_embeddings": ("true or false", lambda v: isinstance(v, bool)),
    "torch_dtype": ("a dtype name (a string)", lambda v: isinstance(v, str)),
    "dtype": ("a dtype name (a string)", lambda v: isinstance(v, str)),
    "decoder_sparse_step": ("a non-negative integer", lambda v: _is_int(v, 0)),
    "mlp_only_layers": ("a list of layer indices", _indices),
    "moe_layers": ("a list of layer indices", _indices),
}


def check_model_config(cfg: Any, path: str | Path) -> None:
    """ModelFormatError naming ``path`` and the key when ``cfg`` (a parsed ``config.json``) is not
    an object or holds a value of the wrong type where mergekitty reads it (at the top level or
    in a nested language-model config such as ``text_config``)."""
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {shown(cfg)}")
    levels: list[tuple[str, dict[str, Any]]] = [("", cfg)]
    for sub in TEXT_CONFIG_KEYS:
        nested = cfg.get(sub)
        if nested is None:
            continue
        if not isinstance(nested, dict):
            raise ModelFormatError(f"{path}: '{sub}' must be a JSON object (a nested config), got {shown(nested)}")
        levels.append((f"{sub}.", nested))
    for prefix, node in levels:
        for key, (expected, ok) in _CHECKS.items():
            value = node.get(key)
            if value is not None and not ok(value):
                raise ModelFormatError(f"{path}: '{prefix}{key}' must be {expected}, got {shown(value)}")
