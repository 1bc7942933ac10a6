"""LoRA extraction (mergekitty-extract-lora), merging (mergekitty-merge-lora) and model+lora inputs.

Golden values come from independent computations: torch.linalg.svd of the weight
difference, PEFT's own loading and merge_and_unload, and transformers' forward pass.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

from mergekitty.errors import MergekittyError, ModelNotFoundError, PlanError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from mergekitty.lora import extract_lora, merge_lora  # noqa: E402


def _weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def _causal_lm(path):
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 16), generator=g)
    with torch.no_grad():
        return model(ids).logits


def _with_adapter(base_path, adapter_path, resize=None):
    model = _causal_lm(base_path)
    if resize is not None:
        model.resize_token_embeddings(resize, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, str(adapter_path)).eval()


def _golden_error(ft_w: torch.Tensor, base_w: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the best rank-k relative error, from an exact SVD."""
    s = torch.linalg.svdvals(ft_w.double() - base_w.double())
    return float(s[rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


@pytest.fixture(scope="module")
def full_rank(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "full"
    return out, extract_lora(llama["ft1"], llama["base"], out, rank=128)


# ------------------------------------------------------------------ extraction
def test_full_rank_adapter_loads_in_peft_and_reproduces_the_finetune(llama, full_rank):
    out, result = full_rank
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 128 // 2 and cfg["lora_alpha"] == cfg["r"]  # hidden 64: the largest possible rank
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # k/v are 32 x 64 (grouped-query attention): their full rank is 32, recorded per module
    assert (
        cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"]
        == 32
        == cfg["alpha_pattern"]["model.layers.0.self_attn.k_proj"]
    )
    # policy: embeddings, head and changed norms are saved in full
    assert {"embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"} <= set(
        cfg["modules_to_save"]
    )
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (64, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 64)
    assert "base_model.model.model.embed_tokens.weight" in tensors and "base_model.model.lm_head.weight" in tensors
    assert max(m.relative_error for m in result.factored) < 1e-5
    report = json.loads((out / "lora_extraction.json").read_text())
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["relative_error"] < 1e-5
    assert "relative error" in (out / "README.md").read_text()

    got = _logits(_with_adapter(llama["base"], out))
    want = _logits(_causal_lm(llama["ft1"]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reconstruction_error_matches_the_best_rank_k_and_falls_with_rank(llama, tmp_path):
    ft, base = _weights(llama["ft1"]), _weights(llama["base"])
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    previous = {m: 1.0 for m in modules}
    for rank in (4, 16, 40, 64):
        result = extract_lora(llama["ft1"], llama["base"], tmp_path / f"r{rank}", rank=rank)
        errors = {m.module: m for m in result.factored}
        for module in modules:
            w = f"{module}.weight"
            golden = _golden_error(ft[w], base[w], rank)
            got = errors[module].relative_error
            assert got >= golden - 1e-5, (module, rank)
            assert got <= golden * 1.03 + 1e-5, (module, rank, got, golden)  # randomized SVD: near-optimal
            assert got < previous[module] or got < 1e-5
            previous[module] = got
            assert errors[module].rank == min(rank, *ft[w].shape)
    assert all(e < 1e-5 for e in previous.values())


def test_low_rank_adapter_logits_are_between_base_and_finetune(llama, tmp_path):
    want = _logits(_causal_lm(llama["ft1"]))
    base_gap = (_logits(_causal_lm(llama["base"])) - want).abs().max()
    gaps = []
    for rank in (8, 32, 64):
        extract_lora(llama["ft1"], llama["base"], tmp_path / f"r{rank}", rank=rank)
        gaps.append((_logits(_with_adapter(llama["base"], tmp_path / f"r{rank}")) - want).abs().max())
    assert gaps[0] < base_gap and gaps[1] < gaps[0] and gaps[2] < 1e-4


def test_adaptive_rank_from_energy_and_sv_epsilon(llama, tmp_path):
    ft, base = _weights(llama["ft1"]), _weights(llama["base"])
    w = "model.layers.0.self_attn.q_proj.weight"
    s = torch.linalg.svdvals(ft[w].double() - base[w].double())
    energy = (s**2).cumsum(0) / (s**2).sum()
    want = int((energy >= 0.5).nonzero()[0]) + 1
    result = extract_lora(llama["ft1"], llama["base"], tmp_path / "energy", rank=64, energy=0.5)
    ranks = {m.module: m.rank for m in result.factored}
    assert ranks["model.layers.0.self_attn.q_proj"] == want
    cfg = result.adapter_config
    assert cfg["rank_pattern"] and max(ranks.values()) == cfg["r"]
    assert all(cfg["rank_pattern"][m] == r == cfg["alpha_pattern"][m] for m, r in ranks.items() if r != cfg["r"])
    eps = float(s[10] + s[11]) / 2  # between two singular values: no float32 tie
    result = extract_lora(llama["ft1"], llama["base"], tmp_path / "eps", rank=64, sv_epsilon=eps)
    assert {m.module: m.rank for m in result.factored}["model.layers.0.self_attn.q_proj"] == int((s > eps).sum())
    # the adaptive adapter still loads
    _logits(_with_adapter(llama["base"], tmp_path / "eps"))


def test_tied_embeddings_and_biases(qwen2, tmp_path):
    """Qwen2: tied embeddings (no lm_head.weight) and q/k/v biases."""
    out = tmp_path / "qwen"
    extract_lora(qwen2["ft1"], qwen2["base"], out, rank=64)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only" and {"embed_tokens", "lm_head"} <= set(cfg["modules_to_save"])
    got = _logits(_with_adapter(qwen2["base"], out))
    torch.testing.assert_close(got, _logits(_causal_lm(qwen2["ft1"])), atol=1e-4, rtol=1e-4)
    merged = tmp_path / "merged"
    merge_lora(qwen2["base"], out, merged, quiet=True)
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    want = _weights(qwen2["ft1"])
    got = _weights(merged)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_embed_lora_factors_embeddings(qwen2, tmp_path):
    out = tmp_path / "emb"
    extract_lora(qwen2["ft1"], qwen2["base"], out, rank=64, embed_lora=True)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (64, 96)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 64)
    assert "base_model.model.lm_head.lora_A.weight" in tensors  # the tied head gets the same update
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"])
    got = _logits(_with_adapter(qwen2["base"], out))
    torch.testing.assert_close(got, _logits(_causal_lm(qwen2["ft1"])), atol=1e-4, rtol=1e-4)
    merged = tmp_path / "merged"
    merge_lora(qwen2["base"], out, merged, quiet=True)
    want = _weights(qwen2["ft1"])
    got = _weights(merged)
    assert "lm_head.weight" not in got  # the head's update equals the embedding's: still tied
    torch.testing.assert_close(
        got["model.embed_tokens.weight"], want["model.embed_tokens.weight"], atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------ extended vocabulary
@pytest.fixture(scope="module")
def extended(llama, tmp_path_factory):
    from mergekitty.tiny_models import add_special_tokens

    return add_special_tokens(llama["ft1"], tmp_path_factory.mktemp("vocab") / "ft-extra", ("<x1>", "<x2>"), seed=7)


def test_extended_vocab_rows_are_dropped_by_default(llama, extended, tmp_path):
    out = tmp_path / "drop"
    result = extract_lora(extended, llama["base"], out, rank=64)
    assert any("dropped" in n for n in result.notes)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.embed_tokens.weight"].shape == (96, 64)
    assert tensors["base_model.model.lm_head.weight"].shape == (96, 64)
    got = _logits(_with_adapter(llama["base"], out))
    want = _logits(_causal_lm(extended))[..., :96]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_extended_vocab_rows_are_kept_with_extend_vocab(llama, extended, tmp_path):
    out = tmp_path / "keep"
    result = extract_lora(extended, llama["base"], out, rank=64, extend_vocab=True, embed_lora=True)
    assert any("--embed-lora is off" in n for n in result.notes)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.embed_tokens.weight"].shape == (98, 64)
    assert (out / "tokenizer.json").is_file()  # the fine-tune's tokenizer, with the new tokens
    got = _logits(_with_adapter(llama["base"], out, resize=98), vocab=98)
    want = _logits(_causal_lm(extended), vocab=98)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    merged = tmp_path / "merged"
    merge_lora(llama["base"], out, merged, quiet=True)
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 98
    assert "<x1>" in (merged / "tokenizer.json").read_text()
    want_w, got_w = _weights(extended), _weights(merged)
    for k in want_w:
        torch.testing.assert_close(got_w[k], want_w[k], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ merge-lora
def test_merge_of_full_rank_extraction_reproduces_the_finetune(llama, full_rank, tmp_path):
    out, _ = full_rank
    merged = tmp_path / "merged"
    changed = merge_lora(llama["base"], out, merged, quiet=True)
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    want, got = _weights(llama["ft1"]), _weights(merged)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    assert (merged / "tokenizer.json").is_file() and (merged / "README.md").is_file()
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 4


def _peft_adapter(base_path, out, **config):
    torch.manual_seed(1)
    model = _causal_lm(base_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm.merge_and_unload().state_dict()


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_of_a_peft_adapter_equals_merge_and_unload(llama, tmp_path, rslora):
    want = _peft_adapter(
        llama["base"],
        tmp_path / "adapter",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"down_proj": 3},
        modules_to_save=["norm"],
        use_rslora=rslora,
    )
    merged = tmp_path / "merged"
    merge_lora(llama["base"], tmp_path / "adapter", merged, quiet=True)
    got = _weights(merged)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """GPT-2: Conv1D layers (weights stored input-major), so adapters use fan_in_fan_out."""
    from mergekitty.tiny_models import make_model

    root = tmp_path_factory.mktemp("gpt2")
    base = make_model(root / "base", "gpt2", seed=0)
    return {"base": base, "ft1": make_model(root / "ft1", "gpt2", seed=1, parent=base)}


def test_fan_in_fan_out_merge_equals_peft(gpt2, tmp_path):
    want = _peft_adapter(
        gpt2["base"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    merged = tmp_path / "merged"
    merge_lora(gpt2["base"], tmp_path / "adapter", merged, quiet=True)
    got = _weights(merged)
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    assert not torch.equal(
        got["transformer.h.0.attn.c_attn.weight"], _weights(gpt2["base"])["transformer.h.0.attn.c_attn.weight"]
    )


def test_fan_in_fan_out_extraction(gpt2, tmp_path):
    out = tmp_path / "adapter"
    extract_lora(gpt2["ft1"], gpt2["base"], out, rank=64)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and "c_attn" in cfg["target_modules"]
    got = _logits(_with_adapter(gpt2["base"], out))
    torch.testing.assert_close(got, _logits(_causal_lm(gpt2["ft1"])), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ model+lora in merge configs
def test_model_plus_lora_reference_equals_merging_the_merged_model(llama, full_rank, tmp_path, write_yaml):
    from mergekitty.api import run_merge

    adapter, _ = full_rank
    low = tmp_path / "low"
    extract_lora(llama["ft1"], llama["base"], low, rank=8)
    merged_lora = tmp_path / "merged-lora"
    merge_lora(llama["base"], low, merged_lora, quiet=True)
    template = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    run_merge(template.format(a=f"{llama['base']}+{low}", b=llama["ft2"]), tmp_path / "via-ref", quiet=True)
    run_merge(template.format(a=merged_lora, b=llama["ft2"]), tmp_path / "via-dir", quiet=True)
    got, want = _weights(tmp_path / "via-ref"), _weights(tmp_path / "via-dir")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    # a full-rank adapter on the base passes through as the fine-tune
    run_merge(
        f"merge_method: passthrough\nmodels:\n  - model: {llama['base']}+{adapter}\n", tmp_path / "pass", quiet=True
    )
    ft = _weights(llama["ft1"])
    for k, v in _weights(tmp_path / "pass").items():
        torch.testing.assert_close(v, ft[k], atol=1e-5, rtol=1e-5)


def test_model_plus_lora_cli_with_lora_merge_cache(llama, full_rank, tmp_path, write_yaml, cli):
    adapter, _ = full_rank
    config = write_yaml(f"merge_method: passthrough\nmodels:\n  - model: {llama['base']}+{adapter}\n")
    proc = cli("mergekitty-yaml", config, tmp_path / "out", "--lora-merge-cache", tmp_path / "cache")
    assert "--lora-merge-cache has no effect" in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()
    ft = _weights(llama["ft1"])
    for k, v in _weights(tmp_path / "out").items():
        torch.testing.assert_close(v, ft[k], atol=1e-5, rtol=1e-5)


def test_lora_merge_dtype_rounds_the_adapted_model(llama, full_rank, tmp_path, write_yaml, cli):
    adapter, _ = full_rank
    ft = _weights(llama["ft1"])
    assert all(v.dtype == torch.float32 for v in ft.values())
    config = write_yaml(f"merge_method: passthrough\nmodels:\n  - model: {llama['base']}+{adapter}\n")
    cli("mergekitty-yaml", config, tmp_path / "out", "--lora-merge-dtype", "bfloat16", "--quiet")
    got = _weights(tmp_path / "out")
    assert set(got) == set(ft)
    for k, v in got.items():
        # every tensor, adapted or not, went through bfloat16
        assert v.dtype == torch.bfloat16, k
        torch.testing.assert_close(v.float(), ft[k].to(torch.bfloat16).float(), atol=1e-5, rtol=8e-3)
    proc = cli("mergekitty-yaml", config, tmp_path / "bad", "--lora-merge-dtype", "int8", "--quiet", check=False)
    assert proc.returncode != 0 and "int8" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from mergekitty.tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("other") / "llama32", "llama", hidden_size=32, intermediate_size=64)


def test_missing_adapter_is_a_clear_error(llama, tmp_path, cli):
    with pytest.raises(ModelNotFoundError, match="not a LoRA adapter"):
        merge_lora(llama["base"], llama["ft1"], tmp_path / "out")  # a model, not an adapter
    proc = cli("mergekitty-merge-lora", llama["base"], tmp_path / "missing", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_adapter_for_another_model_is_a_shape_error(llama, full_rank, other_model, tmp_path, cli):
    adapter, _ = full_rank
    with pytest.raises(PlanError, match="different model"):
        merge_lora(other_model, adapter, tmp_path / "out")
    proc = cli("mergekitty-merge-lora", other_model, adapter, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "different model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="different model"):
        from mergekitty.api import plan_merge

        plan_merge(f"merge_method: passthrough\nmodels:\n  - model: {other_model}+{adapter}\n")
    proc = cli("mergekitty-extract-lora", other_model, llama["base"], tmp_path / "ex", check=False)
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ex" / "adapter_config.json").exists()


def test_malformed_adapters(llama, full_rank, tmp_path):
    import shutil

    adapter, _ = full_rank
    bad = tmp_path / "dora"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(MergekittyError, match="DoRA"):
        merge_lora(llama["base"], bad, tmp_path / "out")
    half = tmp_path / "half"
    shutil.copytree(adapter, half)
    tensors = load_file(str(half / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, str(half / "adapter_model.safetensors"))
    with pytest.raises(MergekittyError, match="incomplete LoRA pair"):
        merge_lora(llama["base"], half, tmp_path / "out")


def test_interrupted_merge_leaves_no_model(llama, full_rank, tmp_path, monkeypatch):
    from mergekitty.lora.apply import LoraCheckpoint

    adapter, _ = full_rank
    calls = []
    original = LoraCheckpoint.tensor

    def failing(self, name):
        calls.append(name)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(self, name)

    monkeypatch.setattr(LoraCheckpoint, "tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        merge_lora(llama["base"], adapter, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("model*.safetensors"))


# ------------------------------------------------------------------ CLI
def test_extract_cli_spellings(llama, tmp_path, cli):
    proc = cli(
        "mergekitty-extract-lora",
        llama["ft1"],
        llama["base"],
        tmp_path / "a",
        "--rank",
        "8",
        "--no-lazy-unpickle",
        "--device",
        "cpu",
    )
    assert "relative reconstruction error" in proc.stderr and "done" in proc.stderr
    cli(
        "mergekitty-extract-lora", "--model", llama["ft1"], "--base-model", llama["base"], "--out-path", tmp_path / "b",
        "--max-rank", "8", "--save-module", "lm_head", "--skip-undecomposable", "--quiet",
    )  # fmt: skip
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert "base_model.model.model.norm.weight" in a and "base_model.model.model.norm.weight" not in b
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] == [
        "embed_tokens",
        "lm_head",
    ]
    assert str(tmp_path / "a") not in (tmp_path / "a" / "README.md").read_text()
    proc = cli("mergekitty-extract-lora", llama["ft1"], llama["base"], check=False)
    assert proc.returncode == 2 and "output path" in proc.stderr


def test_cli_help_is_fast_to_import(cli):
    for exe in ("mergekitty-extract-lora", "mergekitty-merge-lora"):
        assert "Usage" in cli(exe, "--help").stdout
    import subprocess
    import sys

    code = "import sys, mergekitty.cli.extract_lora, mergekitty.cli.merge_lora; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_model_plus_lora_with_added_tokens_brings_its_tokenizer(llama, extended, tmp_path):
    from mergekitty.api import run_merge

    adapter = tmp_path / "adapter"
    extract_lora(extended, llama["base"], adapter, rank=64, extend_vocab=True)
    config = (
        "merge_method: linear\ntokenizer:\n  source: union\nmodels:\n"
        f"  - model: {llama['base']}+{adapter}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5}}\n"
    )
    run_merge(config, tmp_path / "out", quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 98
    assert "<x2>" in (tmp_path / "out" / "tokenizer.json").read_text()
    got = _weights(tmp_path / "out")["model.embed_tokens.weight"]
    want = _weights(extended)["model.embed_tokens.weight"]
    torch.testing.assert_close(got[96:], want[96:], atol=1e-5, rtol=1e-5)  # only the adapter's model has the new rows
