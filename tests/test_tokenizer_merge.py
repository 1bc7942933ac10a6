"""Vocabulary merging end to end through the CLI: union / base / model tokenizer sources, per-token
embedding settings, pad_to_multiple_of, row permutation by token, tied embeddings.

Expected tensors are computed here by token text, from the input tokenizers (transformers) and the
input tensors: for every output token, each model's row is its own row for that token, or the
token's default (the base model's row, else the only model that has it, else the mean)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli

# every test merges through the command line (the vocabulary planning itself: test_vocab_files.py)
pytestmark = pytest.mark.slow

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def derive(src: Path, dst: Path, *, special=(), words=(), permute_seed=None, row_seed=7) -> Path:
    """A copy of model ``src`` whose tokenizer gains added ``special`` tokens and model-vocabulary
    ``words`` (new embedding rows drawn from ``row_seed``), optionally with the ids of the ordinary
    words shuffled (rows moved with them, so every token keeps its embedding)."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tensors = load_file(dst / "model.safetensors")
    vocab = tok["model"]["vocab"]
    n = max(vocab.values()) + 1
    names = [k for k in (EMBED, HEAD) if k in tensors]
    if permute_seed is not None:
        g = torch.Generator().manual_seed(permute_seed)
        movable = sorted(i for i in vocab.values() if i >= 3)
        perm = torch.randperm(len(movable), generator=g).tolist()
        new_of = {old: movable[p] for old, p in zip(movable, perm)}
        for t in list(vocab):
            vocab[t] = new_of.get(vocab[t], vocab[t])
        for k in names:
            moved = tensors[k].clone()
            for old, new in new_of.items():
                moved[new] = tensors[k][old]
            tensors[k] = moved
    extra = list(words) + list(special)
    g = torch.Generator().manual_seed(row_seed)
    for k in names:
        tensors[k] = torch.cat([tensors[k], torch.randn(len(extra), tensors[k].shape[1], generator=g) * 0.1])
    for i, w in enumerate(words):
        vocab[w] = n + i
    for i, s in enumerate(special):
        tok["added_tokens"].append(
            {
                "id": n + len(words) + i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = n + len(extra)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def vocab_models(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": llama["base"],
        "ft1": llama["ft1"],
        "chatml": derive(llama["ft2"], root / "chatml", special=("<|im_start|>", "<|im_end|>")),
        "other": derive(
            llama["ft3"], root / "other", words=("zebra", "yak"), special=("<|im_end|>",), permute_seed=3, row_seed=11
        ),
    }


def vocab_of(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def rows_by_token(path: Path, name: str) -> dict[str, torch.Tensor]:
    tensors = load_file(path / "model.safetensors")
    t = tensors.get(name, tensors.get(EMBED))  # a tied head is the embedding
    return {tok: t[i].float() for tok, i in vocab_of(path).items() if i < t.shape[0]}


def expected_linear(
    models: list[Path], weights: list[float], base: int, out_vocab: dict[str, int], name: str, rows: int, forced=None
):
    forced = forced or {}
    per_model = [rows_by_token(p, name) for p in models]
    hidden = next(iter(per_model[0].values())).shape[0]
    expected = torch.zeros(rows, hidden)
    for tok, i in out_vocab.items():
        if i >= rows:  # a token transformers adds on loading (Qwen2's <|endoftext|>), without a row
            continue
        holders = [m for m in range(len(models)) if tok in per_model[m]]
        if tok in forced:
            default = forced[tok]
        elif len(holders) == 1:
            default = per_model[holders[0]][tok]
        elif base in holders:
            default = per_model[base][tok]
        else:
            default = torch.stack([per_model[m][tok] for m in holders]).mean(0)
        acc = torch.zeros(hidden)
        for m, w in enumerate(weights):
            row = per_model[m][tok] if tok in per_model[m] and tok not in forced else default
            acc += w * row
        expected[i] = acc / sum(weights)
    return expected


def merge(write_yaml, tmp_path, text: str, *extra) -> Path:
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", write_yaml(text), out, *extra)
    return out


def linear_config(models, weights, tokenizer: str, base=None) -> str:
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for m, w in zip(models, weights):
        lines.append(f"  - model: {m}\n    parameters: {{weight: {w}}}")
    if base is not None:
        lines.append(f"base_model: {base}")
    return "\n".join(lines) + "\n" + tokenizer


def test_union_appends_added_tokens_and_aligns_rows(vocab_models, write_yaml, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [vocab_models["base"], vocab_models["ft1"], vocab_models["chatml"]]
    weights = [0.5, 0.3, 0.2]
    out = merge(write_yaml, tmp_path, linear_config(models, weights, "tokenizer:\n  source: union\n", base=models[0]))
    out_vocab = vocab_of(out)
    base_vocab, chat_vocab = vocab_of(models[0]), vocab_of(models[2])
    assert out_vocab == chat_vocab  # the base's ids, then the two added tokens at the chatml model's ids
    tensors = load_file(out / "model.safetensors")
    for name in (EMBED, HEAD):
        expected = expected_linear(models, weights, 0, out_vocab, name, len(out_vocab))
        torch.testing.assert_close(tensors[name], expected, rtol=1e-6, atol=1e-6)
    # the added tokens appear only in the chatml model, so every model uses its row: the merge is that row
    chat_rows = rows_by_token(models[2], EMBED)
    torch.testing.assert_close(tensors[EMBED][out_vocab["<|im_start|>"]], chat_rows["<|im_start|>"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(out_vocab)
    tok = AutoTokenizer.from_pretrained(out)
    text = "w5 w7 <|im_start|> w9 <|im_end|>"
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(models[2])(text)["input_ids"]
    assert tok("w1 w2 w3")["input_ids"] == AutoTokenizer.from_pretrained(models[0])("w1 w2 w3")["input_ids"]
    assert {t.content for t in tok.added_tokens_decoder.values()} >= {"<|im_start|>", "<|im_end|>"}
    assert len(base_vocab) + 2 == len(out_vocab)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tok(text)["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()


def test_union_matches_tokens_across_shuffled_ids(vocab_models, write_yaml, tmp_path):
    """A model whose ordinary words sit at other ids merges row by token, not by id; its new
    words go into the model vocabulary (never splitting base text differently)."""
    models = [vocab_models["base"], vocab_models["chatml"], vocab_models["other"]]
    weights = [0.2, 0.4, 0.4]
    out = merge(write_yaml, tmp_path, linear_config(models, weights, "tokenizer_source: union\n", base=models[0]))
    out_vocab = vocab_of(out)
    assert set(out_vocab) == set(vocab_of(models[1])) | set(vocab_of(models[2]))
    assert all(out_vocab[t] == i for t, i in vocab_of(models[0]).items())  # base ids never move
    tensors = load_file(out / "model.safetensors")
    expected = expected_linear(models, weights, 0, out_vocab, EMBED, len(out_vocab))
    torch.testing.assert_close(tensors[EMBED], expected, rtol=1e-6, atol=1e-6)
    data = json.loads((out / "tokenizer.json").read_text())
    assert "zebra" in data["model"]["vocab"] and all(a["content"] != "zebra" for a in data["added_tokens"])
    from transformers import AutoTokenizer

    tok, base_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(models[0])
    assert tok("w4 w10 w11")["input_ids"] == base_tok("w4 w10 w11")["input_ids"]
    assert tok.decode([out_vocab["zebra"]]) == "zebra"


def test_base_source_cuts_extra_rows(vocab_models, write_yaml, tmp_path):
    models = [vocab_models["base"], vocab_models["chatml"]]
    out = merge(write_yaml, tmp_path, linear_config(models, [0.5, 0.5], "tokenizer_source: base\n", base=models[0]))
    out_vocab = vocab_of(out)
    assert out_vocab == vocab_of(models[0])
    tensors = load_file(out / "model.safetensors")
    assert tensors[EMBED].shape[0] == len(out_vocab)
    torch.testing.assert_close(tensors[HEAD], expected_linear(models, [0.5, 0.5], 0, out_vocab, HEAD, len(out_vocab)))


def test_default_source_is_base(vocab_models, write_yaml, tmp_path):
    """No tokenizer setting: the base's vocabulary (the inputs with more tokens are aligned to it)."""
    models = [vocab_models["base"], vocab_models["other"]]
    out = merge(write_yaml, tmp_path, linear_config(models, [0.5, 0.5], "", base=models[0]))
    assert vocab_of(out) == vocab_of(models[0])
    tensors = load_file(out / "model.safetensors")
    torch.testing.assert_close(
        tensors[EMBED], expected_linear(models, [0.5, 0.5], 0, vocab_of(out), EMBED, len(vocab_of(out)))
    )


def test_model_source_takes_that_vocabulary(vocab_models, write_yaml, tmp_path):
    models = [vocab_models["base"], vocab_models["other"]]
    out = merge(
        write_yaml, tmp_path, linear_config(models, [0.5, 0.5], f"tokenizer_source: {models[1]}\n", base=models[0])
    )
    out_vocab = vocab_of(out)
    assert out_vocab == vocab_of(models[1])
    tensors = load_file(out / "model.safetensors")
    torch.testing.assert_close(tensors[EMBED], expected_linear(models, [0.5, 0.5], 0, out_vocab, EMBED, len(out_vocab)))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(out_vocab)


def test_pad_to_multiple_of_fills_padding_with_the_mean(vocab_models, write_yaml, tmp_path):
    models = [vocab_models["base"], vocab_models["chatml"]]
    weights = [0.5, 0.5]
    cfg = linear_config(models, weights, "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n", base=models[0])
    out = merge(write_yaml, tmp_path, cfg)
    out_vocab = vocab_of(out)
    tensors = load_file(out / "model.safetensors")
    rows = -(-len(out_vocab) // 64) * 64
    assert tensors[EMBED].shape[0] == rows and rows > len(out_vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    real = expected_linear(models, weights, 0, out_vocab, EMBED, len(out_vocab))
    torch.testing.assert_close(tensors[EMBED][: len(out_vocab)], real)
    # each model's padding rows are the mean of its aligned token rows; a linear merge of means is the mean of the merge
    for r in range(len(out_vocab), rows):
        torch.testing.assert_close(tensors[EMBED][r], real.mean(0), rtol=1e-5, atol=1e-6)


def test_token_settings(vocab_models, write_yaml, tmp_path):
    base, chat, other = vocab_models["base"], vocab_models["chatml"], vocab_models["other"]
    models = [base, chat, other]
    weights = [0.2, 0.4, 0.4]
    settings = f"""tokenizer:
  source: union
  tokens:
    <|im_start|>:
      source: {{kind: zero}}
    <|im_end|>:
      source: {other}
      force: true
    w5:
      source: {{kind: model_token, model: {chat}, token: w9}}
      force: true
    w6:
      source: {{kind: model_token, model: {base}, token_id: 1}}
      force: true
    <new_token>:
      source: {{kind: zero}}
"""
    out = merge(write_yaml, tmp_path, linear_config(models, weights, settings, base=base))
    out_vocab = vocab_of(out)
    assert "<new_token>" in out_vocab
    tensors = load_file(out / "model.safetensors")
    emb = tensors[EMBED]
    chat_rows, other_rows = rows_by_token(chat, EMBED), rows_by_token(other, EMBED)
    base_t = load_file(base / "model.safetensors")[EMBED]
    # zero default: only chat has <|im_start|>, the other two models get zeros
    torch.testing.assert_close(emb[out_vocab["<|im_start|>"]], 0.4 * chat_rows["<|im_start|>"] / 1.0)
    # forced: every model uses the other model's row, so the merge is that row
    torch.testing.assert_close(emb[out_vocab["<|im_end|>"]], other_rows["<|im_end|>"])
    torch.testing.assert_close(emb[out_vocab["w5"]], chat_rows["w9"])
    torch.testing.assert_close(emb[out_vocab["w6"]], base_t[1].float())
    assert torch.count_nonzero(emb[out_vocab["<new_token>"]]) == 0


def test_tied_embeddings_stay_tied(qwen2, write_yaml, tmp_path):
    chat = derive(qwen2["ft1"], tmp_path / "chat", special=("<|im_start|>",))
    models = [qwen2["base"], chat]
    out = merge(
        write_yaml, tmp_path, linear_config(models, [0.5, 0.5], "tokenizer:\n  source: union\n", base=models[0])
    )
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors
    out_vocab = vocab_of(out)
    rows = load_file(models[0] / "model.safetensors")[EMBED].shape[0] + 1
    assert tensors[EMBED].shape[0] == rows and out_vocab["<|im_start|>"] == rows - 1
    torch.testing.assert_close(tensors[EMBED], expected_linear(models, [0.5, 0.5], 0, out_vocab, EMBED, rows))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == rows and cfg.get("tie_word_embeddings", True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_no_copy_tokenizer_still_aligns_rows(vocab_models, write_yaml, tmp_path):
    models = [vocab_models["base"], vocab_models["chatml"]]
    out = merge(
        write_yaml,
        tmp_path,
        linear_config(models, [0.5, 0.5], "tokenizer_source: union\n", base=models[0]),
        "--no-copy-tokenizer",
    )
    assert not any((out / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    assert load_file(out / "model.safetensors")[EMBED].shape[0] == len(vocab_of(models[1]))


def test_plan_prints_the_vocabulary_diff(vocab_models, write_yaml, tmp_path):
    models = [vocab_models["base"], vocab_models["chatml"], vocab_models["other"]]
    cfg = write_yaml(linear_config(models, [1, 1, 1], "tokenizer_source: union\n", base=models[0]))
    text = run_cli("mergekitty", "plan", cfg).stdout
    assert "vocabulary" in text and "'<|im_start|>'" in text and "at other ids" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "tokens, needle",
    [
        ("    w5:\n      source: /no/such/model\n", "not one of the merged models"),
        ("    w5:\n      source: {kind: model_token, model: BASE, token_id: 100000}\n", "beyond"),
        ("    <|im_end|>:\n      source: BASE\n", "has no token"),
        ("    w5:\n      source: {kind: modle_token}\n", "did you mean 'model_token'"),
    ],
)
def test_token_setting_errors(vocab_models, write_yaml, tmp_path, tokens, needle):
    models = [vocab_models["base"], vocab_models["chatml"]]
    tokens = tokens.replace("BASE", str(models[0]))
    cfg = write_yaml(linear_config(models, [1, 1], "tokenizer:\n  source: union\n  tokens:\n" + tokens, base=models[0]))
    proc = run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False)
    assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()
