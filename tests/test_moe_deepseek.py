"""mergekitty-moe DeepSeek-MoE output: the layout and config of the original release.

transformers ships no class for it, so the checks are: with no shared expert the model is
exactly the Mixtral output under other names (softmax top-k routing, renormalized, is the
same math); with a shared expert, a plain torch DeepSeek-MoE block (router softmax, top-k,
renormalize, plus the shared MLP) placed into the base llama model reads every output
tensor by its on-disk name and gives finite logits that differ from the base's.
"""

from __future__ import annotations

import json

import pytest

from test_moe import WORDS, build, expert_yaml, prompts_of, tensors

torch = pytest.importorskip("torch")

_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _to_mixtral_name(name: str) -> str:
    parts = name.split(".")
    if ".mlp.gate." in name:
        return name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    if ".mlp.experts." in name:
        i = parts.index("experts")
        e, proj = parts[i + 1], parts[i + 2]
        return ".".join(parts[: i - 1] + ["block_sparse_moe", "experts", e, _W[proj], "weight"])
    return name


def test_without_shared_experts_it_is_the_mixtral_output_renamed(llama, tmp_path):
    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"], llama["ft3"]], prompts=False)
    ds_out, ds = build(tmp_path, text + "architecture: deepseek\n", name="ds")
    mx_out, mx = build(tmp_path, text, name="mx")
    assert (ds.architecture, ds.hf_class, mx.architecture) == ("deepseek", "DeepseekForCausalLM", "mixtral")
    got, want = tensors(ds_out), tensors(mx_out)
    assert {_to_mixtral_name(n) for n in got} == set(want)
    for name, t in got.items():
        assert torch.equal(t, want[_to_mixtral_name(name)]), name
    cfg = json.loads((ds_out / "config.json").read_text())
    base = json.loads((llama["base"] / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekForCausalLM"] and cfg["model_type"] == "deepseek"
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("modeling_deepseek.DeepseekForCausalLM")
    assert cfg["n_routed_experts"] == 3 and cfg["n_shared_experts"] is None and cfg["num_experts_per_tok"] == 2
    assert cfg["first_k_dense_replace"] == 0 and cfg["moe_layer_freq"] == 1 and cfg["scoring_func"] == "softmax"
    assert cfg["moe_intermediate_size"] == base["intermediate_size"] and cfg["norm_topk_prob"] is True
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
    ):
        assert cfg[key] == base[key], key
    assert cfg["rope_theta"] == base.get("rope_theta", (base.get("rope_parameters") or {}).get("rope_theta"))


class _DeepSeekMoEBlock(torch.nn.Module):
    """The DeepSeek-MoE feed-forward block, from its published description."""

    def __init__(self, weights: dict, prefix: str, n_routed: int, top_k: int, shared: bool):
        super().__init__()
        self.w = weights
        self.p = prefix
        self.n, self.k, self.shared = n_routed, top_k, shared

    def _mlp(self, x, name):
        g, u, d = (self.w[f"{name}.{p}_proj.weight"].float() for p in ("gate", "up", "down"))
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    def forward(self, x):
        scores = (x @ self.w[f"{self.p}.gate.weight"].float().T).softmax(-1)
        weight, idx = scores.topk(self.k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.n):
            hit = (idx == e).to(x.dtype)
            w_e = (weight * hit).sum(-1, keepdim=True)
            out = out + w_e * self._mlp(x, f"{self.p}.experts.{e}")
        if self.shared:
            out = out + self._mlp(x, f"{self.p}.shared_experts")
        return out


def test_shared_expert_layout_and_a_reference_forward(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    experts = [llama["ft1"], llama["ft2"]]
    # hidden gates: prompts for the routed experts, none for the gate-less shared expert
    text = expert_yaml(llama["base"], experts, gate_mode="hidden", prompts=True)
    text += f"shared_experts:\n  - source_model: {llama['ft3']}\n"
    out, result = build(tmp_path, text)
    # Qwen2-MoE would need prompts for its shared expert's gate, so DeepSeek is the one that fits
    assert result.architecture == "deepseek"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_shared_experts"] == 1 and cfg["n_routed_experts"] == 2
    got = tensors(out)
    n = cfg["num_hidden_layers"]
    shared_src = tensors(llama["ft3"])
    for layer in range(n):
        for part in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.shared_experts.{part}.weight"
            assert torch.equal(got[name], shared_src[f"model.layers.{layer}.mlp.{part}.weight"]), name
        assert got[f"model.layers.{layer}.mlp.gate.weight"].shape == (2, cfg["hidden_size"])
    assert not any("shared_expert_gate" in k for k in got)

    model = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)
    used = set()
    for layer, block in enumerate(model.model.layers):
        block.mlp = _DeepSeekMoEBlock(got, f"model.layers.{layer}.mlp", 2, cfg["num_experts_per_tok"], True)
        used |= {k for k in got if k.startswith(f"model.layers.{layer}.mlp.")}
    for name, param in model.named_parameters():
        if name in got:
            param.data.copy_(got[name].float())
            used.add(name)
    assert used == set(got), set(got) - used
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        logits = model(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense)


def test_deepseek_reasons(llama, tmp_path):
    from mergekitty.errors import ArchitectureError

    base = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], gate_mode="hidden") + "architecture: deepseek\n"
    with_prompts = (
        base
        + f"shared_experts:\n  - source_model: {llama['ft3']}\n    positive_prompts: {json.dumps(prompts_of(WORDS[2]))}\n"
    )
    with pytest.raises(ArchitectureError, match="deepseek: .*no gate, so it takes no prompts"):
        build(tmp_path, with_prompts)
    two = base + f"shared_experts:\n  - source_model: {llama['ft3']}\n  - source_model: {llama['ft1']}\n"
    with pytest.raises(ArchitectureError, match="deepseek: takes at most one shared expert"):
        build(tmp_path, two)


def test_cli_says_how_to_load_it(llama, tmp_path):
    from conftest import run_cli

    cfg = tmp_path / "moe.yml"
    cfg.write_text(expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False) + "architecture: deepseek\n")
    proc = run_cli("mergekitty-moe", cfg, tmp_path / "out", "--random-seed", "3")
    said = proc.stdout + proc.stderr
    assert "DeepseekForCausalLM" in said and "trust_remote_code=True" in said
    assert (tmp_path / "out" / "config.json").is_file()
