"""Reading a model's vocabulary (token text -> id) from its tokenizer files, without transformers.

Sources, first found wins:
- ``tokenizer.json`` (the fast-tokenizer file): the model vocabulary (BPE, WordPiece, WordLevel:
  a dict; Unigram: a list whose positions are the ids) plus ``added_tokens``;
- ``vocab.json`` (+ ``added_tokens.json``), the slow GPT-2 style files;
- ``vocab.txt`` (one token per line, the line number is the id), slow WordPiece;
- ``tokenizer.model`` (a SentencePiece model), read with a minimal protobuf decoder.

Added tokens listed in ``tokenizer_config.json`` (``added_tokens_decoder``) are merged in, so
both the transformers 4 and 5 layouts are understood.

Every file is read through ``io.model_files`` (confined to the model directory) and checked here,
where it is read: a token id that is not an integer in ``[0, MAX_TOKEN_ID)``, a vocabulary of the
wrong shape, an added token without its ``id`` or ``content`` is a ModelFormatError naming the
file and the key, so that planning and writing only see well-formed vocabularies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError
from ..io.model_files import model_file, read_json, read_text, shown
from ..limits import MAX_TOKEN_ID

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE = "tokenizer.model"


@dataclass(frozen=True)
class AddedToken:
    """An added token's matching flags, as tokenizer.json stores them."""

    content: str
    special: bool = False
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AddedToken:
        return cls(
            content=str(data["content"]),
            special=bool(data.get("special", False)),
            single_word=bool(data.get("single_word", False)),
            lstrip=bool(data.get("lstrip", False)),
            rstrip=bool(data.get("rstrip", False)),
            normalized=bool(data.get("normalized", not data.get("special", False))),
        )

    def to_json(self, token_id: int) -> dict[str, Any]:
        return {
            "id": token_id,
            "content": self.content,
            "single_word": self.single_word,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "normalized": self.normalized,
            "special": self.special,
        }


@dataclass
class Vocabulary:
    """Every token of one tokenizer with its id; ``added`` holds the added tokens' flags."""

    path: Path
    source_file: str
    tokens: dict[str, int]
    added: dict[str, AddedToken] = field(default_factory=dict)
    model_type: str | None = None  # tokenizer.json model type (BPE, Unigram, ...)

    @property
    def size(self) -> int:
        """One past the largest id."""
        return max(self.tokens.values(), default=-1) + 1

    def by_id(self) -> dict[int, str]:
        return {i: t for t, i in self.tokens.items()}


def _token_id(value: Any, path: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TOKEN_ID:
        raise ModelFormatError(
            f"{path}: '{key}' is {shown(value)}; a token id must be an integer from 0 to {MAX_TOKEN_ID - 1:,}"
        )
    return value


def _token_ids(ids: dict[str, Any], path: Path, prefix: str) -> dict[str, int]:
    """``ids`` (token -> id), every id checked; the error names the first bad one."""
    if not all(type(i) is int and 0 <= i < MAX_TOKEN_ID for i in ids.values()):
        for token, i in ids.items():
            _token_id(i, path, prefix + token)
    return ids


def _object(value: Any, path: Path, key: str | None = None) -> dict[str, Any]:
    """``value`` if it is a JSON object; ``key`` None: the whole file."""
    if not isinstance(value, dict):
        what = f"'{key}' must be" if key is not None else "expected"
        raise ModelFormatError(f"{path}: {what} a JSON object, got {shown(value)}")
    return value


def _added_token(entry: Any, path: Path, key: str) -> AddedToken:
    """An added token entry (``tokenizer.json`` ``added_tokens``, ``added_tokens_decoder``)."""
    entry = _object(entry, path, key)
    if not isinstance(entry.get("content"), str):
        raise ModelFormatError(f"{path}: '{key}.content' must be the token text, got {shown(entry.get('content'))}")
    for flag in ("special", "single_word", "lstrip", "rstrip", "normalized"):
        if flag in entry and not isinstance(entry[flag], bool):
            raise ModelFormatError(f"{path}: '{key}.{flag}' must be true or false, got {shown(entry[flag])}")
    return AddedToken.from_json(entry)


def _too_many(count: int, path: Path, what: str) -> None:
    if count > MAX_TOKEN_ID:
        raise ModelFormatError(f"{path}: {what} has {count:,} tokens; at most {MAX_TOKEN_ID:,} are read")


def _from_tokenizer_json(path: Path) -> Vocabulary:
    data = _object(read_json(path), path)
    model = data.get("model")
    if not isinstance(model, dict) or "vocab" not in model:
        raise ModelFormatError(f"{path}: no model vocabulary ('model.vocab')")
    kind = model.get("type")
    if kind is not None and not isinstance(kind, str):
        raise ModelFormatError(f"{path}: 'model.type' must be a string, got {shown(kind)}")
    vocab = model["vocab"]
    tokens: dict[str, int] = {}
    if isinstance(vocab, dict):
        tokens = dict(_token_ids(vocab, path, "model.vocab."))
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the position is the id
        _too_many(len(vocab), path, "'model.vocab'")
        for i, entry in enumerate(vocab):
            piece = entry[0] if isinstance(entry, list) and entry else entry
            if not isinstance(piece, str):
                raise ModelFormatError(f"{path}: 'model.vocab[{i}]' must be [piece, score], got {shown(entry)}")
            tokens.setdefault(piece, i)
    else:
        raise ModelFormatError(f"{path}: 'model.vocab' is neither a mapping nor a list")
    merges = model.get("merges")
    if merges is not None:
        # not read here, but written back when tokens are appended: a broken list would be copied
        if not isinstance(merges, list):
            raise ModelFormatError(f"{path}: 'model.merges' must be a list, got {shown(merges)}")
        if merges and type(merges[0]) is str:  # "a b", the older form
            bad = next((i for i, m in enumerate(merges) if type(m) is not str), None)
        else:  # ["a", "b"]
            bad = next(
                (
                    i
                    for i, m in enumerate(merges)
                    if not (type(m) is list and len(m) == 2 and type(m[0]) is str and type(m[1]) is str)
                ),
                None,
            )
        if bad is not None:
            raise ModelFormatError(
                f'{path}: \'model.merges[{bad}]\' must be "a b" or ["a", "b"] like the others, got {shown(merges[bad])}'
            )
    added = {}
    entries = data.get("added_tokens")
    if entries is not None and not isinstance(entries, list):
        raise ModelFormatError(f"{path}: 'added_tokens' must be a list, got {shown(entries)}")
    for i, entry in enumerate(entries or ()):
        token = _added_token(entry, path, f"added_tokens[{i}]")
        tokens[token.content] = _token_id(entry.get("id"), path, f"added_tokens[{i}].id")
        added[token.content] = token
    return Vocabulary(path.parent, TOKENIZER_JSON, tokens, added, kind)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ModelFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ModelFormatError(f"unsupported protobuf wire type {wire}")


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece model, in id order.

    ModelProto field 1 is the repeated SentencePiece message {1: piece, 2: score, 3: type}."""
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    pieces = []
    pos = 0
    try:
        while pos < len(buf):
            tag, pos = _varint(buf, pos)
            field_no, wire = tag >> 3, tag & 7
            if field_no == 1 and wire == 2:
                n, pos = _varint(buf, pos)
                end = pos + n
                piece, score, kind = "", 0.0, 1
                while pos < end:
                    t, pos = _varint(buf, pos)
                    f, w = t >> 3, t & 7
                    if f == 1 and w == 2:
                        m, pos = _varint(buf, pos)
                        piece = buf[pos : pos + m].decode("utf-8")
                        pos += m
                    elif f == 2 and w == 5:
                        (score,) = struct.unpack("<f", buf[pos : pos + 4])
                        pos += 4
                    elif f == 3 and w == 0:
                        kind, pos = _varint(buf, pos)
                    else:
                        pos = _skip(buf, pos, w)
                pieces.append((piece, score, kind))
            else:
                pos = _skip(buf, pos, wire)
    except (ModelFormatError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ModelFormatError(f"{path}: not a readable SentencePiece model ({exc})") from None
    if not pieces:
        raise ModelFormatError(f"{path}: a SentencePiece model without pieces")
    _too_many(len(pieces), path, "the SentencePiece model")
    return pieces


def _merge_config_added(vocab: Vocabulary, directory: Path) -> None:
    """Added tokens that only the slow-tokenizer files list (transformers 4 layouts)."""
    config = model_file(directory, "tokenizer_config.json")
    if config is not None:
        data = _object(read_json(config), config)
        decoder = data.get("added_tokens_decoder")
        for key, entry in _object(decoder, config, "added_tokens_decoder").items() if decoder is not None else ():
            where = f"added_tokens_decoder.{key}"
            token = _added_token(entry, config, where)
            token_id = _token_id(int(key) if key.isascii() and key.isdigit() and len(key) < 10 else key, config, where)
            if token.content not in vocab.tokens:
                vocab.tokens[token.content] = token_id
                vocab.added[token.content] = token
    extra = model_file(directory, "added_tokens.json")
    if extra is not None:
        for content, token_id in _object(read_json(extra), extra).items():
            token_id = _token_id(token_id, extra, content)
            if content not in vocab.tokens:
                vocab.tokens[content] = token_id
                vocab.added[content] = AddedToken(content)


def read_vocabulary(directory: str | Path) -> Vocabulary | None:
    """The vocabulary of the tokenizer in ``directory``, or None when it has no tokenizer files."""
    directory = Path(directory)
    if (path := model_file(directory, TOKENIZER_JSON)) is not None:
        vocab = _from_tokenizer_json(path)
    elif (path := model_file(directory, "vocab.json")) is not None:
        data = _object(read_json(path), path)
        vocab = Vocabulary(directory, "vocab.json", dict(_token_ids(data, path, "")))
    elif (path := model_file(directory, "vocab.txt")) is not None:
        # the line breaks transformers reads it with (universal newlines)
        lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        _too_many(len(lines), path, "the file")
        tokens: dict[str, int] = {}
        for i, line in enumerate(lines):
            tokens.setdefault(line, i)
        vocab = Vocabulary(directory, "vocab.txt", tokens)
    elif (path := model_file(directory, SENTENCEPIECE)) is not None:
        tokens = {}
        for i, (piece, _, _) in enumerate(sentencepiece_pieces(path)):
            tokens.setdefault(piece, i)
        vocab = Vocabulary(directory, SENTENCEPIECE, tokens)
    else:
        return None
    _merge_config_added(vocab, directory)
    return vocab
