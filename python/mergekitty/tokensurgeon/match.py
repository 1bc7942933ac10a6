"""Which donor token is which model token.

Each token is reduced to the text it stands for, as bytes, by the kind of its tokenizer:

- SentencePiece (``tokenizer.model``, or a ``tokenizer.json`` whose normalizer, pre-tokenizer or
  decoder uses the ``▁`` word-start marker, or a Unigram model): ``▁`` is a space, and a
  byte-fallback piece ``<0xXX>`` is the byte XX;
- byte-level BPE (GPT-2 style: a ``ByteLevel`` pre-tokenizer or decoder, or ``vocab.json``):
  every character stands for one byte through the GPT-2 byte-to-character table (``Ġ`` is a
  space, ``Ċ`` a newline);
- any other tokenizer (WordPiece, WordLevel): the text itself.

Added tokens are their content. So ``▁the`` of a SentencePiece vocabulary is ``Ġthe`` of a
byte-level one, and the single-byte token ``A`` is the byte piece ``<0x41>``.

A donor token is matched, in this order: by role (the donor's bos, eos, pad and unk tokens are
the model's tokens of the same role; a donor token of several roles by the first of ``ROLE_ORDER``
the model has), then by that text. Matched tokens' rows are copied from the
model. The other donor tokens are new: their rows are approximated from the ordinary tokens
(neither special nor matched by role) the two vocabularies share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

from ..errors import ModelFormatError
from ..io.model_files import model_file, read_json
from ..tokenizer.vocab import SENTENCEPIECE, TOKENIZER_JSON, Vocabulary

SENTENCEPIECE_KIND = "sentencepiece"
BYTE_LEVEL_KIND = "byte_level"
PLAIN_KIND = "plain"
WORD_START = "\u2581"  # ▁
# the role a donor token of several roles is matched by: eos (what a shared bos/eos/pad token is
# mostly used as: the end of a text), then the others
ROLE_ORDER = ("eos", "bos", "unk", "pad")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def byte_of_char() -> dict[str, int]:
    """The GPT-2 byte-level table, character -> byte: printable Latin-1 characters stand for
    themselves, the other bytes (controls, space, 0x7f-0xa0, 0xad) for 256, 257, ... in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if chr(b) not in table:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def tokenizer_kind(vocab: Vocabulary) -> str:
    """SENTENCEPIECE_KIND, BYTE_LEVEL_KIND or PLAIN_KIND, from the tokenizer files of ``vocab``."""
    if vocab.source_file == SENTENCEPIECE:
        return SENTENCEPIECE_KIND
    if vocab.source_file == "vocab.json":
        return BYTE_LEVEL_KIND
    if vocab.source_file != TOKENIZER_JSON:
        return PLAIN_KIND
    path = model_file(vocab.path, TOKENIZER_JSON)
    data = read_json(path) if path is not None else {}
    parts = json.dumps([data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return BYTE_LEVEL_KIND
    if WORD_START in parts or '"Metaspace"' in parts or vocab.model_type == "Unigram":
        return SENTENCEPIECE_KIND
    if model_file(vocab.path, SENTENCEPIECE) is not None:
        return SENTENCEPIECE_KIND
    return PLAIN_KIND


def token_text(token: str, kind: str, added: bool) -> tuple[bytes, bool]:
    """The bytes ``token`` stands for, and whether it is a byte piece (``<0xXX>``)."""
    if added:
        return token.encode("utf-8"), False
    if kind == SENTENCEPIECE_KIND:
        m = _BYTE_PIECE.fullmatch(token)
        if m:
            return bytes([int(m[1], 16)]), True
        return token.replace(WORD_START, " ").encode("utf-8"), False
    if kind == BYTE_LEVEL_KIND:
        table = byte_of_char()
        if all(c in table for c in token):
            return bytes(table[c] for c in token), False
    return token.encode("utf-8"), False


@dataclass(frozen=True)
class TokenMatch:
    """Every output row (the donor's ids) and where it comes from.

    ``copied`` donor ids take the model's rows ``copied_from``; ``shared_donor``/``shared_model``
    are the ordinary tokens both vocabularies hold (the atoms the new rows are built from);
    ``new`` donor ids are approximated; ``padding`` rows belong to no donor token."""

    rows: int
    copied: np.ndarray
    copied_from: np.ndarray
    exact: int  # copied because the text matches
    bytes: int  # copied because a byte piece matches a single-byte token
    special: int  # copied because the role matches
    shared_donor: np.ndarray
    shared_model: np.ndarray
    new: np.ndarray
    new_tokens: tuple[str, ...]
    padding: np.ndarray


def _lookup(vocab: Vocabulary, kind: str) -> tuple[dict[bytes, int], set[int]]:
    """Text -> id of ``vocab`` (ordinary tokens first, then added tokens, then byte pieces; the
    smallest id among equals), and the ids of byte pieces."""
    by_text: dict[bytes, int] = {}
    byte_ids: set[int] = set()
    later: list[tuple[int, bytes, int]] = []
    for token, token_id in sorted(vocab.tokens.items(), key=lambda item: item[1]):
        text, is_byte = token_text(token, kind, token in vocab.added)
        if is_byte:
            byte_ids.add(token_id)
        rank = 2 if is_byte else 1 if token in vocab.added else 0
        later.append((rank, text, token_id))
    for _, text, token_id in sorted(later, key=lambda x: x[0]):
        by_text.setdefault(text, token_id)
    return by_text, byte_ids


def _special(vocab: Vocabulary) -> set[int]:
    return {vocab.tokens[t] for t, a in vocab.added.items() if a.special}


def match_tokens(
    model: Vocabulary,
    donor: Vocabulary,
    model_special: dict[str, int],
    donor_special: dict[str, int],
    model_rows: int,
    donor_rows: int,
) -> TokenMatch:
    """Match every token of ``donor`` to ``model`` (module docstring). ``*_special``: role -> id
    (``special.special_ids``); ``*_rows``: the embedding rows of each, the output has
    ``donor_rows``. ModelFormatError when a tokenizer holds ids its embedding has no row for."""
    for vocab, rows, what in ((model, model_rows, "model"), (donor, donor_rows, "donor")):
        if vocab.size > rows:
            top = max(vocab.tokens, key=lambda t: vocab.tokens[t])
            raise ModelFormatError(
                f"{vocab.path / vocab.source_file}: token {top!r} has id {vocab.tokens[top]}, but the {what}'s "
                f"embedding has {rows} rows"
            )
    model_kind, donor_kind = tokenizer_kind(model), tokenizer_kind(donor)
    model_by_text, model_bytes = _lookup(model, model_kind)
    role_of_donor: dict[int, str] = {}
    for name in ROLE_ORDER:  # a token of several roles (one bos/eos/pad token) takes the first
        if name in donor_special and name in model_special:
            role_of_donor.setdefault(donor_special[name], name)
    not_atoms = _special(model) | set(model_special.values())
    donor_not_atoms = _special(donor) | set(donor_special.values())

    copied: list[int] = []
    copied_from: list[int] = []
    shared: list[tuple[int, int]] = []
    counts = {"exact": 0, "bytes": 0, "special": 0}
    new: list[tuple[int, str]] = []
    seen: set[int] = set()
    for token, donor_id in sorted(donor.tokens.items(), key=lambda item: item[1]):
        if donor_id in seen:  # two spellings of one id (a vocabulary and an added token)
            continue
        seen.add(donor_id)
        role = role_of_donor.get(donor_id)
        if role is not None:
            copied.append(donor_id)
            copied_from.append(model_special[role])
            counts["special"] += 1
            continue
        text, donor_is_byte = token_text(token, donor_kind, token in donor.added)
        model_id = model_by_text.get(text)
        if model_id is None:
            new.append((donor_id, token))
            continue
        copied.append(donor_id)
        copied_from.append(model_id)
        counts["bytes" if donor_is_byte or model_id in model_bytes else "exact"] += 1
        if donor_id not in donor_not_atoms and model_id not in not_atoms:
            shared.append((donor_id, model_id))
    padding = np.setdiff1d(np.arange(donor_rows), np.fromiter(seen, dtype=np.int64, count=len(seen)))
    return TokenMatch(
        rows=donor_rows,
        copied=np.asarray(copied, dtype=np.int64),
        copied_from=np.asarray(copied_from, dtype=np.int64),
        exact=counts["exact"],
        bytes=counts["bytes"],
        special=counts["special"],
        shared_donor=np.asarray([d for d, _ in shared], dtype=np.int64),
        shared_model=np.asarray([m for _, m in shared], dtype=np.int64),
        new=np.asarray([d for d, _ in new], dtype=np.int64),
        new_tokens=tuple(t for _, t in new),
        padding=padding.astype(np.int64),
    )
