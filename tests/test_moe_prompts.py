"""MoE gates from empty prompts, and the report of routers that cannot tell experts apart.

An empty prompt stands for what the tokenizer makes of it: the bos token alone when the
tokenizer has one, no token at all (left out) when it has none. The references below are
plain torch computations of the gate formula on those token ids."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from test_moe import tensors

ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"
LAYERS = 4


@pytest.fixture(scope="session")
def nobos_base(llama, family_root):
    """The llama base model with a tokenizer that has no bos token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = family_root / "llama-nobos"
    if not (out / "config.json").exists():
        shutil.copytree(llama["base"], out)
        backend = AutoTokenizer.from_pretrained(llama["base"]).backend_tokenizer
        for f in out.glob("*"):
            if f.name.startswith(("tokenizer", "special_tokens")):
                f.unlink()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).bos_token_id is None
    return out


def moe_yaml(base, experts: list[tuple], gate_mode: str) -> str:
    """``experts``: (source_model, positive_prompts, negative_prompts or None)."""
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "experts:"]
    for src, pos, neg in experts:
        lines += [f"  - source_model: {src}", f"    positive_prompts: {json.dumps(pos)}"]
        if neg is not None:
            lines.append(f"    negative_prompts: {json.dumps(neg)}")
    return "\n".join(lines) + "\n"


def build_file(tmp_path, text: str, name: str = "out"):
    from mergekitty.moe import build_moe

    cfg = tmp_path / "moe.yml"
    cfg.write_text(text)
    out = tmp_path / name
    build_moe(cfg, out, quiet=True, random_seed=0, batch_size=2)
    routers = tensors(out)
    return [routers[ROUTER.format(layer)] for layer in range(LAYERS)]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def token_ids(base, prompt: str) -> list[int]:
    """What the gates tokenize: the prompt's own tokens, with the tokenizer's bos (if any) in front."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def cheap_embed_reference(base, positive, negative=()):
    """Sum over prompts and tokens of the embedding rows, positive minus negative, L2-normalized."""
    emb = tensors(base)["model.embed_tokens.weight"].float()

    def total(prompts):
        return sum(emb[token_ids(base, p)].sum(0) for p in prompts if token_ids(base, p))

    v = total(positive) - (total(negative) if negative else 0)
    return v / v.norm()


def hidden_reference(base, positive, negative=()):
    """[layers, hidden]: mean over prompts of the residual stream entering each layer at the
    last token, positive minus negative, L2-normalized per layer; prompts with no tokens left out."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def mean(prompts):
        states = []
        for p in prompts:
            ids = token_ids(base, p)
            if not ids:
                continue
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            states.append(torch.stack([h[0, -1] for h in hs[:LAYERS]]))
        return torch.stack(states).mean(0)

    v = mean(positive) - (mean(negative) if negative else 0)
    return v / v.norm(dim=-1, keepdim=True)


def test_empty_prompts_load_in_the_config():
    from mergekitty.moe import load_moe_config

    cfg = load_moe_config(
        "base_model: ./b\ngate_mode: hidden\nexperts:\n"
        '  - source_model: ./a\n    positive_prompts: ["math", ""]\n    negative_prompts: ["  "]\n'
        '  - source_model: ./c\n    positive_prompts: [""]\n'
    )
    assert cfg.experts[0].positive_prompts == ["math", ""] and cfg.experts[0].negative_prompts == ["  "]
    assert cfg.experts[1].positive_prompts == [""]


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden"])
def test_empty_prompt_is_the_bos_token_alone(mode, llama, tmp_path, caplog):
    import torch

    experts = [
        (llama["ft1"], ["w3 w4 w5", ""], None),
        (llama["ft2"], ["w30 w31 w32"], [""]),
        (llama["ft3"], [""], None),
    ]
    text = moe_yaml(llama["base"], experts, mode)
    with caplog.at_level(logging.WARNING, logger="mergekitty.moe.gates"):
        routers = build_file(tmp_path, text)
    reference = cheap_embed_reference if mode == "cheap_embed" else hidden_reference
    for e, (_, pos, neg) in enumerate(experts):
        want = reference(llama["base"], pos, neg or ())
        for layer in range(LAYERS):
            row = routers[layer][e]
            assert torch.isfinite(row).all()
            torch.testing.assert_close(row, want if mode == "cheap_embed" else want[layer], atol=1e-4, rtol=1e-4)
    empty_warnings = [r.getMessage() for r in caplog.records if "empty prompts" in r.getMessage()]
    assert len(empty_warnings) == 3, empty_warnings  # one per expert with an empty prompt
    first, second, third = empty_warnings
    adds = "the bos token's embedding row" if mode == "cheap_embed" else "the hidden state at the bos token"
    assert f"moe.yml:{line_of(text, json.dumps(['w3 w4 w5', '']))}" in first
    assert f"expert 0 (source_model {llama['ft1']})" in first and "1 of 2 positive_prompts" in first
    assert adds in first and "nothing but the bos token" not in first
    assert f"expert 1 (source_model {llama['ft2']})" in second and "1 of 1 negative_prompts" in second
    assert f"expert 2 (source_model {llama['ft3']})" in third and "nothing but the bos token" in third


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden_avg"])
def test_without_bos_an_empty_prompt_is_left_out(mode, llama, nobos_base, tmp_path, caplog):
    import torch

    experts = [(llama["ft1"], ["w3 w4 w5", "", "  "], None), (llama["ft2"], ["w30 w31 w32"], [""])]
    text = moe_yaml(nobos_base, experts, mode)
    with caplog.at_level(logging.WARNING, logger="mergekitty.moe.gates"):
        routers = build_file(tmp_path, text)
    # the same gates as without the empty prompts
    plain = [(llama["ft1"], ["w3 w4 w5"], None), (llama["ft2"], ["w30 w31 w32"], None)]
    want = build_file(tmp_path, moe_yaml(nobos_base, plain, mode), name="plain")
    for layer in range(LAYERS):
        assert torch.isfinite(routers[layer]).all()
        torch.testing.assert_close(routers[layer], want[layer], atol=1e-6, rtol=1e-6)
    if mode == "cheap_embed":  # and what that is, by hand
        emb = tensors(nobos_base)["model.embed_tokens.weight"].float()
        v = emb[token_ids(nobos_base, "w3 w4 w5")].sum(0)
        assert token_ids(nobos_base, "w3 w4 w5") == [6, 7, 8]
        torch.testing.assert_close(routers[0][0], v / v.norm(), atol=1e-5, rtol=1e-5)
    messages = [r.getMessage() for r in caplog.records if "empty prompts" in r.getMessage()]
    assert len(messages) == 2
    assert f"expert 0 (source_model {llama['ft1']})" in messages[0] and "2 of 3 positive_prompts" in messages[0]
    assert "no tokens" in messages[0] and "bos token's" not in messages[0]
    assert "nothing is subtracted" in messages[1]


def test_all_empty_prompts_without_bos_are_an_error(llama, nobos_base, tmp_path):
    from mergekitty.errors import ConfigError

    text = moe_yaml(nobos_base, [(llama["ft1"], ["w3 w4 w5"], None), (llama["ft2"], ["", " "], None)], "hidden")
    with pytest.raises(ConfigError) as err:
        build_file(tmp_path, text)
    msg = str(err.value)
    line = line_of(text, json.dumps(["", " "]))
    assert msg.startswith(f"{tmp_path / 'moe.yml'}:{line}, key 'experts[1].positive_prompts[0]'"), msg
    assert f"expert 1 (source_model {llama['ft2']})" in msg and "nothing is left" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------- degenerate routers


def healthy(layers: int = 4, experts: int = 4, hidden: int = 64):
    import torch

    return torch.randn(layers, experts, hidden, generator=torch.Generator().manual_seed(0))


def test_healthy_router_is_not_reported(caplog):
    from mergekitty.moe.gates import warn_degenerate

    with caplog.at_level(logging.WARNING, logger="mergekitty.moe.gates"):
        assert warn_degenerate(healthy()) == []
    assert not caplog.records


BROKEN_LAYER = {
    "zero": lambda layer: layer * 0,
    "near-zero": lambda layer: layer * 1e-9,
    "nan": lambda layer: layer.index_fill(1, layer.new_tensor([5], dtype=int), float("nan")),
    "inf": lambda layer: layer.index_fill(1, layer.new_tensor([5], dtype=int), float("inf")),
}


@pytest.mark.parametrize("broken", list(BROKEN_LAYER))
def test_zero_and_nonfinite_routers_are_reported(broken, caplog):
    from mergekitty.moe.gates import warn_degenerate

    gates = healthy()
    gates[2] = BROKEN_LAYER[broken](gates[2])
    with caplog.at_level(logging.WARNING, logger="mergekitty.moe.gates"):
        assert warn_degenerate(gates) == [2]
    (record,) = caplog.records
    words = "all zero" if "zero" in broken else "NaN or infinite"
    assert words in record.getMessage() and "(layers 2)" in record.getMessage()


def test_single_expert_zero_router_and_dependent_rows_are_reported(caplog):
    from mergekitty.moe.gates import warn_degenerate

    single = healthy(experts=1)
    single[1] = 0
    with caplog.at_level(logging.WARNING, logger="mergekitty.moe.gates"):
        assert warn_degenerate(single) == [1]
    gates = healthy()
    gates[3, 1] = gates[3, 0]  # two experts with the same row: the existing ill-conditioned case
    assert warn_degenerate(gates) == [3]
    assert "nearly dependent" in caplog.text
