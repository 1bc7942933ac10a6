"""A tokenizer source that is not one of the merged models: only its tokenizer is used.

The outside model's vocabulary is the base's ordinary words at shuffled ids, a new word and
added tokens some merged models have and some none has; its weights are garbage, so a merge that
opened them would fail. Expected tensors are computed here with torch from the input files, by
token text: each model's row is its own row for the token, else the token's default (the only
model that has it, else zeros when none has it, else the base's row, else the mean of the models
that have it); rows past the tokens (the outside model's padding) are each model's mean aligned
token row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli, run_yaml
from mergekitty.api import plan_merge
from mergekitty.errors import ConfigError

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PADDING = 2  # rows the outside model's config.json declares beyond its tokens


def _special(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def with_added_tokens(src: Path, dst: Path, tokens: tuple[str, ...], seed: int) -> Path:
    """A copy of model ``src`` with ``tokens`` appended as added tokens, each with new embedding
    and head rows drawn from ``seed``."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    n = max(tok["model"]["vocab"].values()) + 1
    tok["added_tokens"] += [_special(n + i, t) for i, t in enumerate(tokens)]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    tensors = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in (EMBED, HEAD):
        t = tensors[name]
        tensors[name] = torch.cat([t, torch.randn(len(tokens), t.shape[1], generator=g) * 0.1])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = n + len(tokens)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def tokenizer_model(src: Path, dst: Path) -> Path:
    """A model that is never merged: ``src``'s ordinary words at shuffled ids, the new word
    "zebra", added tokens, ``PADDING`` rows more in config.json, and weights that cannot be read."""
    dst.mkdir()
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    movable = sorted(i for i in vocab.values() if i >= 3)
    perm = torch.randperm(len(movable), generator=torch.Generator().manual_seed(5)).tolist()
    new_id = {old: movable[p] for old, p in zip(movable, perm)}
    tok["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
    n = len(vocab)
    tok["model"]["vocab"]["zebra"] = n
    added = ("<tool>", "<|c_only|>", "<|im_start|>", "<only_b>")
    tok["added_tokens"] += [_special(n + 1 + i, t) for i, t in enumerate(added)]
    (dst / "tokenizer.json").write_text(json.dumps(tok, indent=1))
    shutil.copyfile(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = n + 1 + len(added) + PADDING
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file: opening it fails
    return dst


@pytest.fixture(scope="module")
def family(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    return {
        "a": with_added_tokens(llama["base"], root / "a", ("<tool>",), seed=1),
        "b": with_added_tokens(llama["ft1"], root / "b", ("<|im_start|>", "<tool>", "<only_b>"), seed=2),
        "d": with_added_tokens(llama["ft2"], root / "d", ("<|im_start|>",), seed=3),
        "c": tokenizer_model(llama["ft3"], root / "c"),
    }


def vocab_of(path: Path) -> dict[str, int]:
    """Token -> id from a tokenizer.json (the model vocabulary, then the added tokens)."""
    tok = json.loads((path / "tokenizer.json").read_text())
    return {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}


def expected_linear(models: list[Path], weights: list[float], base: int, source: Path, name: str) -> torch.Tensor:
    """The linear merge of ``name`` over ``models``, each aligned to ``source``'s vocabulary."""
    out_vocab = vocab_of(source)
    rows = json.loads((source / "config.json").read_text())["vocab_size"]
    tensors = [load_file(m / "model.safetensors")[name].float() for m in models]
    own = [{t: tensors[m][i] for t, i in vocab_of(p).items()} for m, p in enumerate(models)]
    hidden = tensors[0].shape[1]
    aligned = [torch.zeros(rows, hidden) for _ in models]
    for tok, i in out_vocab.items():
        holders = [m for m in range(len(models)) if tok in own[m]]
        if len(holders) == 1:
            default = own[holders[0]][tok]
        elif not holders:
            default = torch.zeros(hidden)
        elif base in holders:
            default = own[base][tok]
        else:
            default = torch.stack([own[m][tok] for m in holders]).mean(0)
        for m in range(len(models)):
            aligned[m][i] = own[m].get(tok, default)
    token_rows = sorted(out_vocab.values())
    for a in aligned:  # no model has a row past the tokens: the mean of its aligned token rows
        a[len(token_rows) :] = a[token_rows].mean(0)
    return sum(w * a for w, a in zip(weights, aligned)) / sum(weights)


def linear_config(family, tokenizer: str) -> str:
    return (
        "merge_method: linear\ndtype: float32\n"
        f"base_model: {family['a']}\n"
        "models:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {family['d']}\n    parameters: {{weight: 0.2}}\n" + tokenizer
    )


SOURCE_FORMS = {"tokenizer_source": "tokenizer_source: {c}\n", "tokenizer.source": "tokenizer:\n  source: {c}\n"}


@pytest.mark.parametrize("form", SOURCE_FORMS)
def test_rows_follow_the_outside_vocabulary(family, write_yaml, tmp_path, form):
    out = tmp_path / "out"
    run_yaml(write_yaml(linear_config(family, SOURCE_FORMS[form].format(c=family["c"]))), out)
    models = [family["a"], family["b"], family["d"]]
    tensors = load_file(out / "model.safetensors")
    rows = len(vocab_of(family["c"])) + PADDING
    for name in (EMBED, HEAD):
        assert tensors[name].shape[0] == rows
        expected = expected_linear(models, [0.5, 0.3, 0.2], 0, family["c"], name)
        torch.testing.assert_close(tensors[name], expected, rtol=1e-6, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    # a token no merged model has is zeros; one only b has is b's row in every model
    c_vocab = vocab_of(family["c"])
    assert torch.count_nonzero(tensors[EMBED][c_vocab["<|c_only|>"]]) == 0
    b_rows = load_file(family["b"] / "model.safetensors")[EMBED]
    torch.testing.assert_close(tensors[EMBED][c_vocab["<only_b>"]], b_rows[vocab_of(family["b"])["<only_b>"]])


def test_written_tokenizer_is_the_outside_models(family, write_yaml, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    run_yaml(write_yaml(linear_config(family, f"tokenizer_source: {family['c']}\n")), out)
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (family["c"] / name).read_bytes()
    text = "w5 zebra <tool> w7 <|im_start|> w80"
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(family["c"])(text)["input_ids"]
    assert ids != AutoTokenizer.from_pretrained(family["a"])(text)["input_ids"]  # the shuffled ids are used


def test_outside_weights_are_never_opened(family, write_yaml, tmp_path):
    """The outside model's model.safetensors is not a safetensors file; planning and merging
    (the slerp of the published form) never touch it."""
    with pytest.raises(Exception):  # noqa: B017  (the file really is unreadable as weights)
        load_file(family["c"] / "model.safetensors")
    cfg = write_yaml(
        "merge_method: slerp\ndtype: float32\n"
        f"base_model: {family['a']}\n"
        "slices:\n  - sources:\n"
        f"      - model: {family['a']}\n        layer_range: [0, 4]\n"
        f"      - model: {family['b']}\n        layer_range: [0, 4]\n"
        "parameters: {t: 0.5}\n"
        f"tokenizer_source: {family['c']}\n"
    )
    out = tmp_path / "out"
    run_yaml(cfg, out)
    assert load_file(out / "model.safetensors")[EMBED].shape[0] == len(vocab_of(family["c"])) + PADDING


def test_plan_names_the_outside_source(family, write_yaml):
    cfg = write_yaml(linear_config(family, f"tokenizer_source: {family['c']}\n"))
    text = run_cli("mergekitty", "plan", cfg).stdout
    assert "vocabulary:" in text and str(family["c"]) in text and "not merged" in text


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("form", SOURCE_FORMS)
@pytest.mark.parametrize("where", ["missing", "no-tokenizer"])
def test_unusable_outside_source_is_a_config_error(family, write_yaml, tmp_path, form, where):
    if where == "missing":
        source = tmp_path / "no" / "such" / "model"
    else:
        source = tmp_path / "weights-only"
        source.mkdir()
        shutil.copyfile(family["a"] / "config.json", source / "config.json")
    text = linear_config(family, SOURCE_FORMS[form].format(c=source))
    with pytest.raises(ConfigError) as info:
        plan_merge(write_yaml(text))
    assert info.value.key == form
    assert info.value.line == _line_of(text, "source: ")
    assert form in str(info.value) and str(source) in str(info.value)
    if where == "no-tokenizer":
        assert "no tokenizer files" in str(info.value)


def test_token_source_must_still_be_merged(family, write_yaml):
    """A per-token embedding needs that model's rows, so it must be one of the merged models."""
    text = linear_config(
        family, f"tokenizer:\n  source: {family['c']}\n  tokens:\n    <tool>:\n      source: {family['c']}\n"
    )
    with pytest.raises(ConfigError, match="not one of the merged models") as info:
        plan_merge(write_yaml(text))
    assert info.value.key == "tokenizer.tokens.<tool>.source"


def test_an_outside_vocabulary_like_the_inputs_moves_nothing():
    from mergekitty.tokenizer.build import VocabInput, plan_vocabulary
    from mergekitty.tokenizer.vocab import Vocabulary

    words = {f"w{i}": i for i in range(6)}
    inputs = [VocabInput(m, Vocabulary(Path(m), "tokenizer.json", dict(words)), 8) for m in ("a", "b")]
    outside = VocabInput("c", Vocabulary(Path("c"), "tokenizer.json", dict(words)), 8)
    plan = plan_vocabulary(inputs, outside, 0, {}, None)
    assert not plan.changes_rows and plan.rows == 8
    assert plan.vocab_model is None and plan.vocab_dir == Path("c") and plan.source == "c"
