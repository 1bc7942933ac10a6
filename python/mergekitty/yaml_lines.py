"""Load YAML and remember on which line every key and list item starts.

``load_with_lines(text)`` returns the plain Python data (what ``yaml.safe_load`` gives)
and a map from key paths such as ``("slices", 1, "sources", 0, "layer_range")`` to
1-based line numbers, so that config errors can point at the line to fix.

The text is untrusted: characters YAML forbids, values Python cannot hold, nesting deeper than
``MAX_NESTING``, recursive aliases, and aliases that expand to more than ``MAX_CONFIG_VALUES``
values (an alias "bomb") are each a YamlSyntaxError with the line, found before the data is built.
Aliases are walked once per node, so shared anchors cost nothing.

Numbers are read as YAML 1.2 reads them: ``1e-5`` is a float (YAML 1.1, and so PyYAML, wants a
dot in the mantissa and reads it as the string "1e-5"), as the other merge tools' schemas turn
such strings into numbers. A file of several documents (a multi-stage recipe) is a
MultiDocumentError that counts them.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .limits import MAX_CONFIG_VALUES, MAX_NESTING

__all__ = [
    "Document",
    "YamlSyntaxError",
    "DuplicateKeyError",
    "MultiDocumentError",
    "load_documents_with_lines",
    "load_with_lines",
    "line_of",
    "format_path",
]

KeyPath = tuple[Any, ...]


class YamlSyntaxError(ValueError):
    """The text is not valid YAML, or asks for more than a config may hold. ``line`` and
    ``column`` are 1-based, or None when unknown; the message ends with the column."""

    def __init__(self, message: str, line: int | None, column: int | None = None):
        super().__init__(message + (f" (column {column})" if column else ""))
        self.line = line
        self.column = column


class MultiDocumentError(YamlSyntaxError):
    """The text holds several YAML documents (``---`` between them): a multi-stage recipe."""

    def __init__(self, documents: int, line: int | None):
        super().__init__(
            f"the file holds {documents} YAML documents (separated by '---'): a multi-stage recipe, one merge "
            "per document, which this command does not take; run it with mergekitty merge (mergekitty-yaml), "
            "mergekitty-mega or mergekitty multi (in Python: mergekitty.recipe.run_recipe)",
            line,
        )
        self.documents = documents


class DuplicateKeyError(ValueError):
    """A mapping repeats a key (YAML would silently keep the last one)."""

    def __init__(self, path: KeyPath, line: int):
        super().__init__(f"duplicate key '{path[-1]}'")
        self.path = path
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops at MAX_NESTING levels while composing (PyYAML's scanner slows down
    with every open bracket and its composer recurses per level), and whose scalars that Python
    cannot hold (an integer of 5000 digits, the date 2001-02-30) are YAML errors at the scalar,
    not a ValueError from deep inside PyYAML."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise YamlSyntaxError(
                    f"the config is nested more than {MAX_NESTING} levels deep", mark.line + 1, mark.column + 1
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            value = node.value if isinstance(node, ScalarNode) else ""
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {shown!r}: {exc}", node.start_mark
            ) from None


# YAML 1.2 core schema floats that YAML 1.1 reads as strings: an exponent without a dot in the
# mantissa or without a sign ("1e-5", "5e10", "1.5e3", ".5E3"). Tried after YAML 1.1's int and
# float forms, which keep their meaning.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def _scalar_key(loader: yaml.SafeLoader, node: Node) -> Any:
    if isinstance(node, ScalarNode):
        try:
            return loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            return node.value
    return None


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _check_size(root: Node) -> None:
    """Refuse a document nested deeper than MAX_NESTING, with a recursive alias, or holding more
    than MAX_CONFIG_VALUES values once every alias is expanded. Each node is visited once (sizes
    and heights are kept per node), without recursion, so a bomb costs what its text does."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_nodes: set[int] = set()  # the path from the root to the node being visited
    stack: list[tuple[Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, leaving = stack.pop()
        key = id(node)
        if leaving:
            open_nodes.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            height[key] = 1 + max((height[id(c)] for c in children), default=0)
            if size[key] > MAX_CONFIG_VALUES:
                raise YamlSyntaxError(
                    f"the config holds more than {MAX_CONFIG_VALUES:,} values once its aliases (*name) are "
                    "expanded; no merge needs that many",
                    node.start_mark.line + 1,
                )
            continue
        if key in open_nodes:
            raise YamlSyntaxError(
                "an alias refers to a value that contains it (a recursive alias)", node.start_mark.line + 1
            )
        if depth + height.get(key, 1) - 1 > MAX_NESTING:
            raise YamlSyntaxError(f"the config is nested more than {MAX_NESTING} levels deep", node.start_mark.line + 1)
        if key in size:
            continue
        open_nodes.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node))


def _walk(loader: yaml.SafeLoader, node: Node, path: KeyPath, lines: dict[KeyPath, int], seen_nodes: set[int]) -> None:
    """Record the line of every key and item below ``node``. A node reached again through an
    alias is not walked again: paths below the alias take the line of the alias' target."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
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
            _walk(loader, value_node, sub, lines, seen_nodes)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*path, i)
            lines[sub] = item.start_mark.line + 1
            _walk(loader, item, sub, lines, seen_nodes)


def _reader_error(text: str, exc: yaml.reader.ReaderError) -> YamlSyntaxError:
    """A character YAML does not allow (a control character, a lone surrogate), at its line and column."""
    position = exc.position
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    char = exc.character
    code = char if isinstance(char, int) else ord(char) if isinstance(char, str) and len(char) == 1 else None
    what = f"the character U+{code:04X}" if code is not None else "a character"
    return YamlSyntaxError(
        f"YAML syntax error: {what} is not allowed in YAML; write it escaped in a double-quoted string", line, column
    )


def _documents_at_most(text: str, limit: int) -> int:
    """How many documents the text starts (counting stops past ``limit``): cheap, before any
    document is composed. A syntax error here is left for the composer to report."""
    if "---" not in text and "..." not in text:
        return 1
    return _count_documents(text, limit)[0]


def _count_documents(text: str, limit: int | None = None) -> tuple[int, int | None]:
    """(documents, line of the second one), from the parser's events."""
    count, second = 0, None
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.DocumentStartEvent):
                count += 1
                if count == 2 and event.start_mark is not None:
                    second = event.start_mark.line + 1
                if limit is not None and count > limit:
                    break
    except yaml.YAMLError:
        pass
    return count, second


def load_with_lines(text: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse one YAML document; return ``(data, {key path: line})``.

    Raises YamlSyntaxError (with the line) for malformed YAML or a document over the limits
    above, and DuplicateKeyError for a key given twice in one mapping.
    """
    try:
        if _documents_at_most(text, 1) > 1:
            raise MultiDocumentError(*_count_documents(text))
    except yaml.reader.ReaderError as exc:
        raise _reader_error(text, exc) from None
    documents = load_documents_with_lines(text)
    if not documents:
        return None, {}
    return documents[0].data, documents[0].lines


class Document:
    """One YAML document of a file: its data, the line of every key (counted in the whole
    file), and the lines it spans (1-based, ``last`` inclusive)."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], first: int, last: int) -> None:
        self.data = data
        self.lines = lines
        self.first = first
        self.last = last


def load_documents_with_lines(text: str, max_documents: int = 256) -> list[Document]:
    """Every document of the text (``---`` between them), each as ``load_with_lines`` reads one;
    empty documents are left out. More than ``max_documents`` is a YamlSyntaxError."""
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        raise _reader_error(text, exc) from None
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if len(documents) >= max_documents:
                raise YamlSyntaxError(
                    f"the file holds more than {max_documents} YAML documents", node.start_mark.line + 1
                )
            _check_size(node)
            lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
            _walk(loader, node, (), lines, set())
            data = loader.construct_document(node)
            if data is None:
                continue
            end = node.end_mark  # just past the node: the start of the next line, or within the last
            documents.append(Document(data, lines, node.start_mark.line + 1, end.line + (1 if end.column else 0)))
        return documents
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise YamlSyntaxError(f"YAML syntax error: {problem}{context}", line, column) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(text, exc) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML syntax error: {exc}", None) from None
    except RecursionError:  # merged mappings nest in ways the composer's count does not see
        mark = loader.get_mark()
        raise YamlSyntaxError(
            f"the config is nested more than {MAX_NESTING} levels deep", mark.line + 1, mark.column + 1
        ) from None
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
    for errors about a model found while opening it (``config`` has ``line_of`` and ``source_name``).
    A ``MissingExtraError`` is returned as it is: it is about the install, not about the config."""
    from .errors import MissingExtraError

    if isinstance(exc, MissingExtraError):
        return exc
    line = config.line_of(key)
    where = (config.source_name or "config") + (f":{line}" if line else "") + f", key '{format_path(key)}'"
    return type(exc)(f"{where}: {exc}")
