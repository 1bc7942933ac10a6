"""Load YAML and remember on which line every key and list item starts.

``load_with_lines(text)`` returns the plain Python data (what ``yaml.safe_load`` gives)
and a map from key paths such as ``("slices", 1, "sources", 0, "layer_range")`` to
1-based line numbers, so that config errors can point at the line to fix.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["YamlSyntaxError", "DuplicateKeyError", "load_with_lines", "line_of", "format_path"]

KeyPath = tuple[Any, ...]


class YamlSyntaxError(ValueError):
    """The text is not valid YAML. ``line`` is 1-based, or None when unknown."""

    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.line = line


class DuplicateKeyError(ValueError):
    """A mapping repeats a key (YAML would silently keep the last one)."""

    def __init__(self, path: KeyPath, line: int):
        super().__init__(f"duplicate key '{path[-1]}'")
        self.path = path
        self.line = line


def _scalar_key(loader: yaml.SafeLoader, node: Node) -> Any:
    if isinstance(node, ScalarNode):
        try:
            return loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            return node.value
    return None


def _walk(loader: yaml.SafeLoader, node: Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, MappingNode):
        # Keys written twice are an error; keys that override a merged ``<<: *anchor`` are not.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = _scalar_key(loader, key_node)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: YAML construction rejects it
                continue
            if duplicate:
                raise DuplicateKeyError((*path, key), key_node.start_mark.line + 1)
            seen.add(key)
        loader.flatten_mapping(node)  # merged pairs first, explicit ones after (they win)
        for key_node, value_node in node.value:
            key = _scalar_key(loader, key_node)
            if key is None and not isinstance(key_node, ScalarNode):
                continue
            sub = (*path, key)
            lines[sub] = key_node.start_mark.line + 1
            _walk(loader, value_node, sub, lines)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*path, i)
            lines[sub] = item.start_mark.line + 1
            _walk(loader, item, sub, lines)


def load_with_lines(text: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse one YAML document; return ``(data, {key path: line})``.

    Raises YamlSyntaxError (with the line) for malformed YAML and DuplicateKeyError
    for a key given twice in one mapping.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
        _walk(loader, node, (), lines)
        data = loader.construct_document(node)
        return data, lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise YamlSyntaxError(f"YAML syntax error: {problem}{context}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML syntax error: {exc}", None) from None
    finally:
        loader.dispose()


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of ``path``, or of its nearest ancestor that is in the map."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def format_path(path: KeyPath) -> str:
    """``("slices", 1, "sources", 0, "layer_range")`` -> ``slices[1].sources[0].layer_range``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def error_at_key(exc: Exception, config: Any, key: KeyPath) -> Exception:
    """``exc`` again (same type), its message prefixed with the config file, line and ``key``:
    for errors about a model found while opening it (``config`` has ``line_of`` and ``source_name``)."""
    line = config.line_of(key)
    where = (config.source_name or "config") + (f":{line}" if line else "") + f", key '{format_path(key)}'"
    return type(exc)(f"{where}: {exc}")
