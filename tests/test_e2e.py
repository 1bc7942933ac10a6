"""End to end through the CLI: merge tiny fixture models, load the result with transformers,
and compare its logits with a model whose weights were computed directly in torch."""

import json

import torch
from safetensors.torch import load_file

from conftest import run_cli


def _state(path):
    from safetensors import safe_open

    out = {}
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _logits(model_dir=None, state=None, config_dir=None):
    import transformers

    if model_dir is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        cfg = transformers.AutoConfig.from_pretrained(config_dir)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in k for k in missing), missing  # only a tied head may be absent
        model.tie_weights()
    model.eval()
    ids = torch.arange(1, 17).view(2, 8) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_linear_three_models(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 0.5}}
  - model: {llama["ft2"]}
    parameters: {{weight: 0.3}}
  - model: {llama["ft3"]}
    parameters: {{weight: 0.4}}
merge_method: linear
dtype: float32
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    states = [_state(llama[k]) for k in ("ft1", "ft2", "ft3")]
    w = [0.5, 0.3, 0.4]
    expected = {k: sum(wi * s[k].double() for wi, s in zip(w, states)) / sum(w) for k in states[0]}
    got = _state(out)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], atol=1e-6, rtol=1e-6)
    ref = _logits(state={k: v.float() for k, v in expected.items()}, config_dir=llama["ft1"])
    torch.testing.assert_close(_logits(out), ref, atol=1e-4, rtol=1e-4)
    # side files
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "mergekitty" in card and "library_name: transformers" in card and "Linear" in card
    assert (out / "mergekitty_config.yml").read_text() == cfg.read_text()
    assert not list(out.glob(".*partial"))


def test_task_arithmetic_with_lambda_and_bf16_output(mistral, tmp_path, write_yaml):
    cfg = write_yaml(f"""
base_model: {mistral["base"]}
models:
  - model: {mistral["ft1"]}
    parameters: {{weight: 0.7}}
  - model: {mistral["ft2"]}
    parameters: {{weight: 0.6}}
merge_method: task_arithmetic
parameters:
  lambda: 0.8
out_dtype: bfloat16
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    base, s1, s2 = (_state(mistral[k]) for k in ("base", "ft1", "ft2"))
    got = _state(out)
    for k in base:
        expected = base[k].double() + 0.8 * (
            0.7 * (s1[k].double() - base[k].double()) + 0.6 * (s2[k].double() - base[k].double())
        )
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].double(), expected.to(torch.bfloat16).double(), atol=1e-6, rtol=2**-7)
    assert (
        json.loads((out / "config.json").read_text())[
            "dtype" if "dtype" in json.loads((mistral["base"] / "config.json").read_text()) else "torch_dtype"
        ]
        == "bfloat16"
    )
    ref = _logits(state={k: got[k].float() for k in got}, config_dir=mistral["base"])
    torch.testing.assert_close(_logits(out), ref, atol=1e-4, rtol=1e-4)


def test_gradient_parameters_across_layers(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters:
      weight: [0.0, 1.0]
  - model: {llama["ft2"]}
    parameters:
      weight: [1.0, 0.0]
merge_method: linear
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    s1, s2, got = _state(llama["ft1"]), _state(llama["ft2"]), _state(out)
    for layer in range(4):
        t = layer / 3
        k = f"model.layers.{layer}.mlp.up_proj.weight"
        expected = t * s1[k].double() + (1 - t) * s2[k].double()
        torch.testing.assert_close(got[k].double(), expected, atol=1e-6, rtol=1e-6)
    # embeddings get t=0, the head t=1
    torch.testing.assert_close(got["model.embed_tokens.weight"], s2["model.embed_tokens.weight"])
    torch.testing.assert_close(got["lm_head.weight"], s1["lm_head.weight"])


def test_passthrough_frankenmerge(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
slices:
  - sources:
      - model: {llama["ft1"]}
        layer_range: [0, 3]
  - sources:
      - model: {llama["ft2"]}
        layer_range: [1, 4]
merge_method: passthrough
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    s1, s2, got = _state(llama["ft1"]), _state(llama["ft2"]), _state(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    mapping = [(s1, 0), (s1, 1), (s1, 2), (s2, 1), (s2, 2), (s2, 3)]
    for out_layer, (src, in_layer) in enumerate(mapping):
        k_out = f"model.layers.{out_layer}.self_attn.q_proj.weight"
        assert torch.equal(got[k_out], src[f"model.layers.{in_layer}.self_attn.q_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], s1["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], s2["model.norm.weight"])
    assert torch.isfinite(_logits(out)).all()


def test_tied_embeddings_stay_tied(qwen2, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {qwen2["ft1"]}
    parameters: {{weight: 1.0}}
  - model: {qwen2["ft2"]}
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    got = _state(out)
    assert "lm_head.weight" not in got
    s1, s2 = _state(qwen2["ft1"]), _state(qwen2["ft2"])
    expected = {k: (s1[k].double() + s2[k].double()) / 2 for k in s1}
    ref = _logits(state={k: v.float() for k, v in expected.items()}, config_dir=qwen2["ft1"])
    torch.testing.assert_close(_logits(out), ref, atol=1e-4, rtol=1e-4)


def test_sharded_output_and_sharded_and_bin_inputs(llama, tmp_path, write_yaml):
    import transformers

    sharded, binary = tmp_path / "ft1_sharded", tmp_path / "ft2_bin"
    m1 = transformers.AutoModelForCausalLM.from_pretrained(llama["ft1"])
    m1.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(llama["ft2"])
    m2.save_pretrained(binary, safe_serialization=False)
    if not list(binary.glob("pytorch_model*.bin")):
        sd = {k: v.contiguous() for k, v in m2.state_dict().items()}
        torch.save(sd, binary / "pytorch_model.bin")
        for f in binary.glob("*.safetensors"):
            f.unlink()
    cfg = write_yaml(f"""
base_model: {llama["base"]}
models:
  - model: {sharded}
    parameters: {{weight: 1.0}}
  - model: {binary}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet", "--out-shard-size", "50K")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        assert shard.stat().st_size <= 50_000 + 8192 or len(load_file(shard)) == 1
    base, s1, s2, got = _state(llama["base"]), _state(llama["ft1"]), _state(llama["ft2"]), _state(out)
    for k in base:
        expected = base[k].double() + (s1[k].double() - base[k].double()) + 0.5 * (s2[k].double() - base[k].double())
        torch.testing.assert_close(got[k].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(_logits(out)).all()


def test_dry_run_reads_no_weights_and_writes_nothing(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
slices:
  - sources:
      - model: {llama["ft1"]}
        layer_range: [0, 2]
  - sources:
      - model: {llama["ft1"]}
        layer_range: [1, 3]
merge_method: passthrough
""")
    out = tmp_path / "out"
    proc = run_cli("mergekitty-yaml", cfg, out, "--dry-run")
    assert not out.exists()
    assert "layer map" in proc.stdout and "peak memory estimate" in proc.stdout
    proc = run_cli("mergekitty", "plan", cfg)
    assert "output size" in proc.stdout


def test_integer_and_other_dtypes_pass_through(llama, tmp_path, write_yaml):
    """Non-float tensors are copied (never averaged) when the models agree; a float8 tensor is copied byte for byte."""
    import shutil

    from safetensors.torch import save_file

    models = []
    for name in ("ft1", "ft2"):
        d = tmp_path / name
        shutil.copytree(llama[name], d)
        state = load_file(d / "model.safetensors")
        state["model.rotary_emb.position_ids"] = torch.arange(12, dtype=torch.int64)
        state["model.extra_scale"] = torch.tensor([0.5, 1.5], dtype=torch.float8_e4m3fn)
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        models.append(d)
    cfg = write_yaml(f"""
models:
  - {{model: {models[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {models[1]}, parameters: {{weight: 1.0}}}}
merge_method: linear
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    got = _state(out)
    assert got["model.rotary_emb.position_ids"].dtype == torch.int64
    assert torch.equal(got["model.rotary_emb.position_ids"], torch.arange(12))
    frag = tmp_path / "frag"
    cfg2 = write_yaml(
        f"""
slices:
  - sources: [{{model: {models[0]}, layer_range: [0, 2]}}]
merge_method: passthrough
""",
        "frag.yml",
    )
    run_cli("mergekitty-yaml", cfg2, frag, "--quiet")
    got = _state(frag)
    assert got["model.extra_scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(
        got["model.extra_scale"].view(torch.uint8),
        torch.tensor([0.5, 1.5], dtype=torch.float8_e4m3fn).view(torch.uint8),
    )


def test_differing_integer_tensors_give_a_clear_error(llama, tmp_path, write_yaml):
    import shutil

    from safetensors.torch import save_file

    models = []
    for i, name in enumerate(("ft1", "ft2")):
        d = tmp_path / name
        shutil.copytree(llama[name], d)
        state = load_file(d / "model.safetensors")
        state["model.rotary_emb.position_ids"] = torch.arange(12, dtype=torch.int64) + i
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        models.append(d)
    cfg = write_yaml(f"""
models:
  - {{model: {models[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {models[1]}, parameters: {{weight: 1.0}}}}
merge_method: linear
""")
    proc = run_cli("mergekitty-yaml", cfg, tmp_path / "out", "--quiet", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "position_ids" in proc.stderr and "integer" in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_rerun_into_the_same_directory_leaves_no_stale_files(llama, tmp_path, write_yaml):
    out = tmp_path / "out"
    sharded = write_yaml(
        f"""
models: [{{model: {llama["ft1"]}, parameters: {{weight: 1.0}}}}]
merge_method: linear
""",
        "a.yml",
    )
    run_cli("mergekitty-yaml", sharded, out, "--quiet", "--out-shard-size", "50K")
    assert (out / "model.safetensors.index.json").is_file()
    (out / "chat_template.jinja").write_text("{{ stale }}")
    run_cli("mergekitty-yaml", sharded, out, "--quiet", "--no-copy-tokenizer")
    names = sorted(p.name for p in out.iterdir())
    assert names.count("model.safetensors") == 1 and not any(n.startswith("model-0") for n in names), names
    assert (
        "model.safetensors.index.json" not in names
        and "chat_template.jinja" not in names
        and "tokenizer.json" not in names
    )
    assert torch.isfinite(_logits(out)).all()
