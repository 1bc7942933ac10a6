"""A multi-stage recipe: several merge configs in one YAML file, later ones reading earlier ones
by name. Everything about the recipe as written is checked here, before any model is opened:
names, references, cycles, and names that could also be read as a model.

Two formats exist and both are read:
- ``mergekitty-mega``: every document has a ``name`` except at most one, which takes the file's
  stem; every document is an output.
- ``mergekit-multi``: names are optional, at most one document is unnamed (the final merge);
  unnamed documents cannot be referenced.

A model string (before any ``+lora``) equal to a document's name reads that document's output. A
single path segment that is neither a name nor a local directory is an error: the older tool
reads it as a name and the newer one as a Hub id, and a recipe must not depend on which.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["Recipe", "RecipeDocument", "load_recipe", "is_recipe_file", "is_recipe_text"]

MAX_DOCUMENTS = 64


@dataclass(frozen=True)
class RecipeDocument:
    """One merge of a recipe: its name (given, or the file stem for the unnamed one), its config
    (a MergeConfiguration located in the recipe file) and the documents it reads, by name."""

    name: str
    named: bool  # whether the document gave its name (False: the unnamed, final merge)
    config: Any
    line: int  # the document's first line in the file
    reads: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    """The documents of a recipe file in an order where every document comes after those it reads."""

    documents: tuple[RecipeDocument, ...]
    source: str  # the file (or "<recipe>"), for messages
    text: str  # the whole recipe, recorded with the final model

    def __getitem__(self, name: str) -> RecipeDocument:
        found = next((d for d in self.documents if d.name == name), None)
        if found is None:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"the recipe has no document '{name}' (its documents: {', '.join(self.names)}){hint}",
                source=self.source,
            )
        return found

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.documents]

    def readers(self, name: str) -> list[str]:
        """The documents that read ``name``'s output."""
        return [d.name for d in self.documents if name in d.reads]

    @property
    def sinks(self) -> list[RecipeDocument]:
        """The documents no other document reads: the recipe's results."""
        return [d for d in self.documents if not self.readers(d.name)]

    @property
    def unnamed(self) -> RecipeDocument | None:
        return next((d for d in self.documents if not d.named), None)

    def needed_for(self, names: list[str], stop: set[str] | frozenset[str] = frozenset()) -> list[RecipeDocument]:
        """``names`` and every document they read, directly or not, in recipe order; a document
        of ``stop`` (one read from disk) is not followed, unless it is one of ``names``."""
        wanted: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in wanted or (name in stop and name not in names):
                continue
            wanted.add(name)
            todo.extend(self[name].reads)
        return [d for d in self.documents if d.name in wanted]


def is_recipe_file(path: str | os.PathLike[str]) -> bool:
    """Whether the YAML file at ``path`` holds more than one document (False when it cannot be
    read: loading it as one config then says why)."""
    from ..limits import MAX_CONFIG_BYTES

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES * 4 + 1)
        return is_recipe_text(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return False


def is_recipe_text(text: str) -> bool:
    """Whether YAML text holds more than one non-empty document."""
    from ..yaml_lines import YamlSyntaxError, load_documents_with_lines

    if "---" not in text:
        return False
    try:
        return len(load_documents_with_lines(text, MAX_DOCUMENTS)) > 1
    except YamlSyntaxError:
        return False


def load_recipe(config: str | os.PathLike[str], require_nameless: bool = False) -> Recipe:
    """Read a recipe from a .yml/.yaml file path or YAML text. Raises ConfigError (with the
    file and line) for anything wrong with it as written."""
    from ..config import MERGE_CONFIG
    from ..yaml_lines import YamlSyntaxError, load_documents_with_lines

    text, source, stem = _read(config)
    try:
        raw = load_documents_with_lines(text, MAX_DOCUMENTS)
    except YamlSyntaxError as exc:
        raise ConfigError(str(exc), line=exc.line, source=source) from None
    if not raw:
        raise ConfigError("the recipe holds no merge", source=source)
    names: list[tuple[str | None, int]] = []
    configs = []
    for doc in raw:
        name = _name_of(doc, source)
        names.append((name, doc.first))
        lines = dict(doc.lines)
        doc_text = "\n".join(text.split("\n")[doc.first - 1 : doc.last]).rstrip("\n") + "\n"
        configs.append(MERGE_CONFIG.from_data(doc.data, source=source, lines=lines, text=doc_text))
    given = _check_names(names, source, stem, require_nameless)
    reads = [tuple(_references(c, given, source)) for c in configs]
    documents = [RecipeDocument(name, named, c, line, r) for (name, named, line), c, r in zip(given, configs, reads)]
    return Recipe(tuple(_ordered(documents, source)), source, text)


def _read(config: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(text, source name for messages, the file's stem)."""
    text = str(config)
    if isinstance(config, os.PathLike) or (
        "\n" not in text and (Path(text).suffix.lower() in (".yml", ".yaml") or Path(text).is_file())
    ):
        path = Path(config)
        return _file_text(path), text, path.stem
    return str(config), "<recipe>", "final"


def _file_text(path: Path) -> str:
    from ..config import read_config_file
    from ..limits import MAX_CONFIG_BYTES

    return read_config_file(path, MAX_CONFIG_BYTES * MAX_DOCUMENTS // 16)  # several configs' worth


def _name_of(doc: Any, source: str) -> str | None:
    if not isinstance(doc.data, dict) or "name" not in doc.data:
        return None
    name = doc.data["name"]
    line = doc.lines.get(("name",))
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("a document's name must be a non-empty string", key="name", line=line, source=source)
    if "/" in name or "\\" in name or "+" in name or "@" in name or name in (".", ".."):
        raise ConfigError(
            f"document name '{name}' cannot be used: a name is one path segment without '/', '+' or '@' "
            "(it names the document's output directory)",
            key="name",
            line=line,
            source=source,
        )
    return name


def _check_names(
    names: list[tuple[str | None, int]], source: str, stem: str, require_nameless: bool
) -> list[tuple[str, bool, int]]:
    """(name, given, line) per document: duplicate names and more than one unnamed document are
    errors; the unnamed one is named after the file's stem."""
    seen: dict[str, int] = {}
    unnamed = [line for name, line in names if name is None]
    if len(unnamed) > 1:
        raise ConfigError(
            f"documents at lines {', '.join(map(str, unnamed))} have no name: at most one document (the final "
            "merge) may be unnamed",
            key="name",
            line=unnamed[1],
            source=source,
        )
    if require_nameless and not unnamed:
        raise ConfigError(
            "every document has a name, but --require-nameless asks for one unnamed document", source=source
        )
    out = []
    for name, line in names:
        if name is not None and name in seen:
            raise ConfigError(
                f"document name '{name}' is also the name of the document at line {seen[name]}",
                key="name",
                line=line,
                source=source,
            )
        if name is not None:
            seen[name] = line
    for name, line in names:
        if name is None:
            final, n = stem, 1
            while final in seen:  # a named document took the stem
                n += 1
                final = f"{stem}-{n}"
            out.append((final, False, line))
        else:
            out.append((name, True, line))
    return out


def _model_keys(config: Any) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Every model reference of a config and the key that names it: the models merged, and a
    tokenizer source that is a model."""
    from ..refs import ModelReference

    seen = set()
    for ref in config.referenced_models():
        key = config.model_key(ref)
        if ref not in seen and key is not None:
            seen.add(ref)
            yield ref, key
    tok = getattr(config, "tokenizer", None)
    source = tok.source if tok is not None else config.tokenizer_source
    if isinstance(source, ModelReference):
        yield source, ("tokenizer", "source") if tok is not None else ("tokenizer_source",)


def _references(config: Any, given: list[tuple[str, bool, int]], source: str) -> Iterator[str]:
    """The names of the documents ``config`` reads; an unknown single-segment name, a name that
    is also a local directory, or a reference to the unnamed document is a ConfigError at its key."""
    referable = {name for name, named, _ in given if named}
    unnamed = {name for name, named, _ in given if not named}
    for ref, key in _model_keys(config):
        path = ref.model.path
        if path in referable and ref.model.revision is not None:
            raise config.error(f"'{ref.model}': the output of document '{path}' has no revisions", key=key)
        for what, p in (("model", path), ("LoRA adapter", ref.lora.path if ref.lora is not None else None)):
            if p is None:
                continue
            if what == "LoRA adapter" and p in referable:
                raise config.error(
                    f"'{p}' names a document of the recipe, which is a model, not a LoRA adapter", key=key
                )
            if what == "model":
                found = _reference(p, referable, unnamed, config, key)
                if found is not None:
                    yield found


def _reference(path: str, referable: set[str], unnamed: set[str], config: Any, key: tuple[Any, ...]) -> str | None:
    local = Path(path).expanduser()
    if path in referable:
        if "/" not in path and _is_dir(local):
            raise config.error(
                f"'{path}' is both the name of a document of this recipe and a local directory; rename the "
                f"document, or write ./{path} for the directory",
                key=key,
            )
        return path
    if path in unnamed and not _is_dir(local):
        raise config.error(
            f"'{path}' is the unnamed (final) document of the recipe, which no other document can read; give it a name",
            key=key,
        )
    if "/" in path or "\\" in path or _is_dir(local) or path.startswith((".", "~")):
        return None
    close = difflib.get_close_matches(path, sorted(referable), n=1)
    hint = (
        f"; did you mean '{close[0]}'?" if close else (f" (names: {', '.join(sorted(referable))})" if referable else "")
    )
    raise config.error(
        f"'{path}' is neither the name of a document of this recipe nor a local directory{hint} "
        "(a Hub model needs its full id, organisation/name, in a recipe)",
        key=key,
    )


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _ordered(documents: list[RecipeDocument], source: str) -> list[RecipeDocument]:
    """The documents so that each comes after those it reads (file order otherwise); a cycle is a
    ConfigError naming it, at the line of the reference that closes it."""
    by_name = {d.name: d for d in documents}
    state: dict[str, str] = {}
    out: list[RecipeDocument] = []

    def visit(doc: RecipeDocument, path: list[str]) -> None:
        if state.get(doc.name) == "done":
            return
        if state.get(doc.name) == "open":
            cycle = path[path.index(doc.name) :] + [doc.name]
            reader = by_name[path[-1]]
            key = next(k for ref, k in _model_keys(reader.config) if ref.model.path == doc.name)
            raise reader.config.error(f"the recipe has a cycle: {' -> '.join(cycle)}", key=key)
        state[doc.name] = "open"
        for name in doc.reads:
            visit(by_name[name], [*path, doc.name])
        state[doc.name] = "done"
        out.append(doc)

    for doc in documents:
        visit(doc, [])
    return out
