"""Layout override files, for models whose tensor names the inference cannot understand.

A ``mergekitty_layout.json`` next to a model's ``config.json`` (or any JSON/YAML file given
with ``--layout-override FILE``) states the layout instead of inferring it::

    {
      "layer_prefix": "trunk.blocks",
      "num_layers_key": "depth",
      "pre": ["tok_table.*", "trunk.aux.*"],
      "post": ["final.*", "readout.weight"]
    }

- ``layer_prefix`` (required): the layer stack is every tensor named ``<layer_prefix>.<N>.<rest>``.
- ``num_layers_key`` (optional): the dotted ``config.json`` key holding the layer count
  (``text_config.num_hidden_layers``); slicing rewrites it. Without it the usual keys are tried.
- ``pre`` / ``post``: glob patterns (``fnmatch``) of the other tensors: ``pre`` tensors come
  before the stack (embeddings: first slice, t=0), ``post`` tensors after it (final norm, head:
  last slice, t=1). Every tensor outside the stack must match one of them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError
from ..text import listing

if TYPE_CHECKING:
    from .layout import ModelLayout

OVERRIDE_FILE = "mergekitty_layout.json"
_KEYS = {"layer_prefix", "num_layers_key", "pre", "post"}


@dataclass(frozen=True)
class LayoutOverride:
    layer_prefix: str
    num_layers_key: str | None
    pre: tuple[str, ...]
    post: tuple[str, ...]
    source: str  # the file, for error messages


def load_layout_override(path: str | Path) -> LayoutOverride:
    """Read and check a layout override file (JSON, or YAML for .yml/.yaml)."""
    from ..errors import ModelFormatError
    from ..io.model_files import read_json, read_text
    from ..yaml_lines import DuplicateKeyError, YamlSyntaxError, load_with_lines

    path = Path(path)
    try:
        if path.suffix in (".yml", ".yaml"):
            data, _ = load_with_lines(read_text(path))
        else:
            data = read_json(path)
    except ModelFormatError as exc:  # unreadable, not UTF-8, invalid JSON, nested too deeply
        raise ArchitectureError(f"layout override {exc}") from None
    except (YamlSyntaxError, DuplicateKeyError) as exc:
        line = getattr(exc, "line", None)
        raise ArchitectureError(f"layout override {path}{f':{line}' if line else ''} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ArchitectureError(f"layout override {path} must be a mapping with 'layer_prefix', 'pre' and 'post'")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ArchitectureError(
            f"layout override {path}: unknown key(s) {listing(unknown, quote=True)}; expected {listing(sorted(_KEYS), quote=True)}"
        )
    prefix = data.get("layer_prefix")
    if not isinstance(prefix, str) or not prefix or prefix.endswith("."):
        raise ArchitectureError(
            f"layout override {path}: 'layer_prefix' must be a name such as 'model.layers' (no trailing dot)"
        )
    key = data.get("num_layers_key")
    if key is not None and not isinstance(key, str):
        raise ArchitectureError(f"layout override {path}: 'num_layers_key' must be a dotted config.json key")
    lists = {}
    for name in ("pre", "post"):
        value = data.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ArchitectureError(f"layout override {path}: '{name}' must be a list of tensor name patterns")
        lists[name] = tuple(value)
    return LayoutOverride(prefix, key, lists["pre"], lists["post"], str(path))


def model_layout_override(directory: str | Path) -> LayoutOverride | None:
    """The ``mergekitty_layout.json`` of a model directory (confined to it), or None without one."""
    from ..io.model_files import model_file

    path = model_file(directory, OVERRIDE_FILE)
    return load_layout_override(path) if path is not None else None


def layout_from_override(
    tensor_names: Iterable[str], cfg: dict[str, Any], override: LayoutOverride, where: str = "model"
) -> ModelLayout:
    """The ModelLayout that ``override`` describes, checked against the model's tensors and config."""
    from .layout import ModelLayout, get_nested, layer_count_key

    names = list(tensor_names)
    numbered = re.compile(re.escape(override.layer_prefix) + r"\.(\d+)\.(.+)$")
    layers: dict[int, list[str]] = {}
    pre, post, unmatched = [], [], []
    for name in names:
        m = numbered.match(name)
        if m:
            layers.setdefault(int(m[1]), []).append(m[2])
        elif any(fnmatch.fnmatchcase(name, p) for p in override.pre):
            pre.append(name)
        elif any(fnmatch.fnmatchcase(name, p) for p in override.post):
            post.append(name)
        else:
            unmatched.append(name)
    src = f"{where} (layout from {override.source})"
    if not layers:
        raise ArchitectureError(f"{src}: no tensor is named '{override.layer_prefix}.<N>.<name>'")
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
        raise ArchitectureError(f"{src}: tensors outside the layer stack match neither 'pre' nor 'post': {shown}")
    count = max(layers) + 1
    missing = sorted(set(range(count)) - set(layers))
    if missing:
        raise ArchitectureError(f"{src}: layer stack '{override.layer_prefix}' has no tensors for layers {missing[:5]}")
    key = override.num_layers_key
    if key is not None:
        value = get_nested(cfg, key)
        if not isinstance(value, int):
            raise ArchitectureError(f"{src}: config.json has no integer '{key}' (num_layers_key)")
        if value != count:
            raise ArchitectureError(
                f"{src}: config.json '{key}' is {value} but '{override.layer_prefix}' has {count} layers"
            )
    else:
        key = layer_count_key(cfg)
        if key is not None and get_nested(cfg, key) != count:
            key = None  # not this stack's count; slicing then keeps the config's value
    layer_tensors = {i: tuple(layers[i]) for i in sorted(layers)}
    return ModelLayout(count, key, override.layer_prefix, layer_tensors, tuple(pre), tuple(post))
