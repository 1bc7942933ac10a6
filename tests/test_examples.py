"""The README's examples: the tiny models generator and every config under examples/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import run_cli

# each example builds the tiny models and merges them through the command line
pytestmark = pytest.mark.slow

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yml"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    run_cli(sys.executable, "-m", "mergekitty.tiny_models", "tiny-models", cwd=root)
    return root


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_example_merges_and_loads(workdir, config):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workdir / f"merged-{config.stem}"
    run_cli("mergekitty-yaml", config, out, "--quiet", cwd=workdir)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == model.get_input_embeddings().weight.shape[0]


def test_union_example_keeps_every_added_token(workdir):
    from transformers import AutoTokenizer

    config = next(p for p in EXAMPLES if p.stem == "tiny-union")
    out = workdir / "merged-union-check"
    run_cli("mergekitty-yaml", config, out, "--quiet", cwd=workdir)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    base = AutoTokenizer.from_pretrained(workdir / "tiny-models" / "base").get_added_vocab()
    for name in ("chat-chatml", "chat-tools"):
        source = AutoTokenizer.from_pretrained(workdir / "tiny-models" / name)
        new = [t for t in source.get_added_vocab() if t not in base]
        assert len(new) == 2 and all(t in vocab for t in new)
        text = " ".join(new) + " w3 w4"
        assert tok.decode(tok(text)["input_ids"]) == source.decode(source(text)["input_ids"])
    assert len(tok) == 100 and tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False).startswith(
        "<|im_start|>user"
    )
