"""Reading the files of an input model directory: confined to it, bounded, with typed errors.

A model directory is downloaded input. Every file it refers to (weights, the index,
``config.json``, the tokenizer files, the chat template, a LoRA adapter's files,
``mergekitty_layout.json``) is opened through ``confined`` or ``model_file``, so that neither an
index entry nor a symlink can pull a file from elsewhere into a merge. JSON files are read with
``read_json``: invalid UTF-8, invalid JSON and nesting deeper than ``MAX_NESTING`` are each a
ModelFormatError naming the file, with the line and column. What the data must hold is checked by
the module that reads it (``architecture.config_json``, ``tokenizer.vocab``, ``lora.adapter``),
once, where it is read.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError
from ..limits import MAX_NESTING

__all__ = ["confined", "model_file", "read_text", "read_json", "shown", "undecodable_at"]


def confined(directory: Path, name: str, referrer: str) -> Path:
    """``directory / name``, refusing a name that leaves the model directory: an absolute path, a
    ``..`` component, or a symlink whose target is outside it. The one exception is the Hugging
    Face cache layout, where ``<repo>/snapshots/<revision>/<file>`` links into ``<repo>/blobs/``.
    ``referrer`` (the index file, or the directory) is named in the error."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise ModelFormatError(f"{referrer}: refers to '{name}', which is not a file inside {directory}")
    path = directory / name
    root = directory.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target == a or a in target.parents for a in allowed):
        raise ModelFormatError(
            f"{referrer}: '{name}' resolves to {target}, outside the model directory {directory}; refusing to read it"
        )
    return path


def model_file(directory: str | Path, name: str) -> Path | None:
    """The file ``name`` of model directory ``directory`` (confined), or None when it has none."""
    directory = Path(directory)
    if not (directory / name).is_file():
        return None
    return confined(directory, name, str(directory))


def undecodable_at(exc: UnicodeDecodeError) -> tuple[int, int, int]:
    """(line, column, byte) of the first byte that is not UTF-8; line and column are 1-based."""
    raw = exc.object
    line = raw.count(b"\n", 0, exc.start) + 1
    column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
    return line, column, raw[exc.start]


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ModelFormatError naming the file (and the line of a bad byte)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column, byte = undecodable_at(exc)
        raise ModelFormatError(f"{path}: not UTF-8 text (byte 0x{byte:02x} at line {line}, column {column})") from None


def nesting_exceeds(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests deeper than ``limit``: one level at a time, without recursion
    (json.loads gives exactly dicts and lists; a 150k-token tokenizer.json takes milliseconds)."""
    level = [data]
    for _ in range(limit):
        children = chain.from_iterable(n.values() if type(n) is dict else n for n in level)
        level = [c for c in children if type(c) is dict or type(c) is list]
        if not level:
            return False
    return True


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; ModelFormatError naming the file for unreadable or invalid
    JSON and for nesting deeper than MAX_NESTING (the data is handed to code that recurses)."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ModelFormatError(f"{path}: invalid JSON: {exc}") from None
    except RecursionError:
        data = None
        deep = True
    else:
        deep = isinstance(data, (dict, list)) and nesting_exceeds(data, MAX_NESTING)
    if deep:
        raise ModelFormatError(f"{path}: JSON nested more than {MAX_NESTING} levels deep")
    return data


def shown(value: Any) -> str:
    """``value`` as JSON for an error message, cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
