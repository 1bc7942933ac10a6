"""Reading vocabularies from every tokenizer file layout, and writing the merged tokenizer files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mergekitty.errors import ModelFormatError
from mergekitty.tokenizer.build import VocabInput, plan_vocabulary
from mergekitty.tokenizer.vocab import read_vocabulary
from mergekitty.tokenizer.write import write_tokenizer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def sentencepiece_model(pieces: list[str]) -> bytes:
    """A SentencePiece ModelProto: repeated field 1 {1: piece, 2: score, 3: type}, with an
    unrelated length-delimited field 2 (a trainer spec) in between."""
    body = b""
    for i, piece in enumerate(pieces):
        raw = piece.encode()
        msg = (
            _field(1, 2, _varint(len(raw)) + raw)
            + _field(2, 5, struct.pack("<f", -float(i)))
            + _field(3, 0, _varint(1))
        )
        body += _field(1, 2, _varint(len(msg)) + msg)
        if i == 1:
            spec = _field(1, 2, _varint(3) + b"abc")
            body += _field(2, 2, _varint(len(spec)) + spec)
    return body


def test_sentencepiece_vocabulary(tmp_path):
    pieces = ["<unk>", "<s>", "</s>", "\u2581the", "\u2581merge", "\u00e9t\u00e9"]
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(pieces))
    vocab = read_vocabulary(tmp_path)
    assert vocab.source_file == "tokenizer.model"
    assert vocab.tokens == {p: i for i, p in enumerate(pieces)}


def test_truncated_sentencepiece_is_a_format_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(["<unk>", "a", "b"])[:-3])
    with pytest.raises(ModelFormatError, match="tokenizer.model"):
        read_vocabulary(tmp_path)


def test_slow_files_and_config_added_tokens(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "c": 2}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<x>": 3}))
    decoder = {
        "4": {
            "content": "<y>",
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    vocab = read_vocabulary(tmp_path)
    assert vocab.tokens == {"a": 0, "b": 1, "c": 2, "<x>": 3, "<y>": 4}
    assert vocab.added["<y>"].special and not vocab.added["<y>"].normalized


def test_vocab_txt_and_missing_tokenizer(tmp_path):
    assert read_vocabulary(tmp_path) is None
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    assert read_vocabulary(tmp_path).tokens == {"[PAD]": 0, "[UNK]": 1, "hello": 2}


def test_broken_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        read_vocabulary(tmp_path)


def _bpe_dir(path: Path, words: list[str], added: list[str], with_sp: bool) -> Path:
    path.mkdir()
    vocab = {w: i for i, w in enumerate(words)}
    data = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": len(words) + i,
                "content": a,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, a in enumerate(added)
        ],
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    }
    (path / "tokenizer.json").write_text(json.dumps(data))
    decoder = {str(len(words) + i): {"content": a, "special": True} for i, a in enumerate(added)}
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    if with_sp:
        (path / "tokenizer.model").write_bytes(sentencepiece_model(words))
    return path


def _union(tmp_path, base_words, other_words, other_added):
    base = _bpe_dir(tmp_path / "base", base_words, [], with_sp=True)
    other = _bpe_dir(tmp_path / "other", other_words, other_added, with_sp=False)
    inputs = [
        VocabInput("base", read_vocabulary(base), len(base_words)),
        VocabInput("other", read_vocabulary(other), len(other_words) + len(other_added)),
    ]
    plan = plan_vocabulary(inputs, "union", 0, {}, None)
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(plan, base, out)
    return base, out, plan


def test_added_tokens_keep_the_sentencepiece_model(tmp_path):
    words = ["<unk>", "a", "b"]
    base, out, plan = _union(tmp_path, words, words, ["<|im_start|>"])
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    written = read_vocabulary(out)
    assert written.tokens == {"<unk>": 0, "a": 1, "b": 2, "<|im_start|>": 3}
    assert written.added["<|im_start|>"].special
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["3"]["content"] == "<|im_start|>"


def test_ordinary_tokens_go_into_the_model_vocabulary(tmp_path):
    base, out, plan = _union(tmp_path, ["<unk>", "a", "b"], ["<unk>", "b", "c", "a"], ["<t>"])
    assert not (out / "tokenizer.model").exists()  # SentencePiece cannot take the new piece "c"
    data = json.loads((out / "tokenizer.json").read_text())
    assert data["model"]["vocab"] == {"<unk>": 0, "a": 1, "b": 2, "c": 3}
    assert [(a["id"], a["content"]) for a in data["added_tokens"]] == [(4, "<t>")]
    # the other model's rows, by token: b was its row 1, a its row 3
    other_map = plan.row_maps[1]
    assert other_map.tolist() == [0, 3, 1, 2, 4]


def test_sentencepiece_only_tokenizer_records_added_tokens(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.model").write_bytes(sentencepiece_model(["<unk>", "a", "b"]))
    other = _bpe_dir(tmp_path / "other", ["<unk>", "a", "b"], ["<|im_end|>"], with_sp=False)
    inputs = [VocabInput("base", read_vocabulary(base), 3), VocabInput("other", read_vocabulary(other), 4)]
    plan = plan_vocabulary(inputs, "union", 0, {}, None)
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(plan, base, out)
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert read_vocabulary(out).tokens == {"<unk>": 0, "a": 1, "b": 2, "<|im_end|>": 3}


def _inputs(*specs):
    from mergekitty.tokenizer.vocab import Vocabulary

    return [
        VocabInput(name, Vocabulary(Path(name), "tokenizer.json", dict(tokens)), rows) for name, tokens, rows in specs
    ]


def test_padding_rows_of_the_vocabulary_model_are_kept():
    from mergekitty.tokenizer.build import OWN_MEAN

    words = {f"w{i}": i for i in range(8)}
    inputs = _inputs(("base", words, 10), ("other", {**words, "new": 8}, 9))
    plan = plan_vocabulary(inputs, "union", 0, {}, None)
    assert plan.rows == 10 and plan.tokens["new"] == 8
    assert plan.row_maps[0].tolist()[8:] == [-1, 9]  # "new" from the defaults; row 9 is base's own padding
    assert plan.row_maps[1].tolist()[8:] == [8, OWN_MEAN]
    assert plan.defaults == [((1, 8),)]
    padded = plan_vocabulary(inputs, "union", 0, {}, 4)
    assert padded.rows == 12 and padded.row_maps[0].tolist()[9:] == [9, OWN_MEAN, OWN_MEAN]  # its padding row stays


def test_tokens_beyond_the_embedding_rows_are_reported_and_skipped():
    words = {f"w{i}": i for i in range(10)}
    inputs = _inputs(("base", words, 10), ("short", words, 8))
    plan = plan_vocabulary(inputs, "base", 0, {}, None)
    assert plan.diffs[1].beyond == [("w8", 8), ("w9", 9)] and "2 ids beyond" in plan.diffs[1].summary()
    assert plan.row_maps[1].tolist()[8:] == [-1, -1]  # w8, w9: the base's rows (the only holder)
    assert plan.defaults == [((0, 8),), ((0, 9),)]
    assert plan.diffs[0].empty()


def test_identical_vocabularies_move_nothing():
    words = {f"w{i}": i for i in range(6)}
    plan = plan_vocabulary(_inputs(("a", words, 6), ("b", words, 6)), "union", 0, {}, None)
    assert not plan.changes_rows and not plan.rewrites_tokenizer and plan.rows == 6
