"""Reading a model's vocabulary (token text -> id) from its tokenizer files, without transformers.

Sources, first found wins:
- ``tokenizer.json`` (the fast-tokenizer file): the model vocabulary (BPE, WordPiece, WordLevel:
  a dict; Unigram: a list whose positions are the ids) plus ``added_tokens``;
- ``vocab.json`` (+ ``added_tokens.json``), the slow GPT-2 style files;
- ``vocab.txt`` (one token per line, the line number is the id), slow WordPiece;
- ``tokenizer.model`` (a SentencePiece model), read with a minimal protobuf decoder.

Added tokens listed in ``tokenizer_config.json`` (``added_tokens_decoder``) are merged in, so
both the transformers 4 and 5 layouts are understood.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not a readable JSON file ({exc})") from None


def _from_tokenizer_json(path: Path) -> Vocabulary:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise ModelFormatError(f"{path}: no model vocabulary ('model.vocab')")
    kind = model.get("type")
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        tokens = {str(t): int(i) for t, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the position is the id
        tokens = {}
        for i, entry in enumerate(vocab):
            piece = entry[0] if isinstance(entry, (list, tuple)) else entry
            tokens.setdefault(str(piece), i)
    else:
        raise ModelFormatError(f"{path}: 'model.vocab' is neither a mapping nor a list")
    added = {}
    for entry in data.get("added_tokens") or ():
        token = AddedToken.from_json(entry)
        tokens[token.content] = int(entry["id"])
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
    buf = path.read_bytes()
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
    return pieces


def _merge_config_added(vocab: Vocabulary, directory: Path) -> None:
    """Added tokens that only the slow-tokenizer files list (transformers 4 layouts)."""
    config = directory / "tokenizer_config.json"
    if config.is_file():
        data = _read_json(config)
        decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
        for key, entry in (decoder or {}).items():
            if isinstance(entry, dict) and "content" in entry and entry["content"] not in vocab.tokens:
                token = AddedToken.from_json(entry)
                vocab.tokens[token.content] = int(key)
                vocab.added[token.content] = token
    extra = directory / "added_tokens.json"
    if extra.is_file():
        data = _read_json(extra)
        for content, token_id in (data or {}).items() if isinstance(data, dict) else ():
            if content not in vocab.tokens:
                vocab.tokens[content] = int(token_id)
                vocab.added[content] = AddedToken(content)


def read_vocabulary(directory: str | Path) -> Vocabulary | None:
    """The vocabulary of the tokenizer in ``directory``, or None when it has no tokenizer files."""
    from ..io.checkpoint import confined

    directory = Path(directory)
    if (directory / TOKENIZER_JSON).is_file():
        vocab = _from_tokenizer_json(confined(directory, TOKENIZER_JSON, str(directory)))
    elif (directory / "vocab.json").is_file():
        data = _read_json(directory / "vocab.json")
        if not isinstance(data, dict):
            raise ModelFormatError(f"{directory / 'vocab.json'}: not a token -> id mapping")
        vocab = Vocabulary(directory, "vocab.json", {str(t): int(i) for t, i in data.items()})
    elif (directory / "vocab.txt").is_file():
        lines = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        tokens: dict[str, int] = {}
        for i, line in enumerate(lines):
            tokens.setdefault(line, i)
        vocab = Vocabulary(directory, "vocab.txt", tokens)
    elif (directory / SENTENCEPIECE).is_file():
        tokens = {}
        for i, (piece, _, _) in enumerate(sentencepiece_pieces(directory / SENTENCEPIECE)):
            tokens.setdefault(piece, i)
        vocab = Vocabulary(directory, SENTENCEPIECE, tokens)
    else:
        return None
    _merge_config_added(vocab, directory)
    return vocab
