"""mergekitty-moe: output layouts against transformers, expert weights, gates, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import _family, run_cli

# Disjoint word sets of the tiny word-level tokenizer ("w0 w1 ..."), one per expert.
WORDS = [[f"w{i}" for i in range(start, start + 8)] for start in (3, 30, 60)]


def prompts_of(words: list[str], n: int = 4) -> list[str]:
    """``n`` prompts of three words each, ending in different words of ``words``."""
    return [" ".join(words[i : i + 3]) for i in range(n)]


def tensors(path: Path) -> dict:
    """Every tensor of a model directory, read with safetensors (not through mergekitty)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def header(path: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                out[name] = (tuple(h.get_slice(name).get_shape()), h.get_slice(name).get_dtype())
    return out


def expert_yaml(base, experts, gate_mode="random", shared=None, extra="", prompts=True):
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "experts_per_token: 2", extra, "experts:"]
    for i, src in enumerate(experts):
        lines.append(f"  - source_model: {src}")
        if prompts:
            lines.append(f"    positive_prompts: {json.dumps(prompts_of(WORDS[i % 3]))}")
    if shared is not None:
        lines += ["shared_experts:", f"  - source_model: {shared}"]
        if prompts:
            lines.append(f"    positive_prompts: {json.dumps(['w90 w91 w92', 'w91 w92'])}")
    return "\n".join(line for line in lines if line) + "\n"


@pytest.fixture(scope="session")
def qwen3(family_root):
    return _family(family_root, "qwen3")


@pytest.fixture(scope="session")
def llama_tied(family_root):
    from mergekitty.tiny_models import make_model

    root = family_root / "llama-tied"
    if not (root / "ft1" / "config.json").exists():
        make_model(root / "base", "llama", seed=0, tie_word_embeddings=True)
        make_model(root / "ft1", "llama", seed=1, parent=root / "base")
        make_model(root / "ft2", "llama", seed=2, parent=root / "base")
    return {"base": root / "base", "ft1": root / "ft1", "ft2": root / "ft2"}


def build(tmp_path, text, name="out", **kwargs):
    from mergekitty.moe import build_moe

    out = tmp_path / name
    result = build_moe(text, out, quiet=True, **{"random_seed": 0, **kwargs})
    return out, result


def load(out: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def transformers_layout(out: Path, tmp_path: Path) -> dict:
    """Names, shapes and dtypes that transformers itself saves for a model with this config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_config(
        cfg, dtype=getattr(torch, cfg.dtype) if isinstance(cfg.dtype, str) else cfg.dtype
    )
    ref = tmp_path / "reference"
    model.save_pretrained(ref)
    return header(ref)


CASES = {
    # name: (family fixture, expected class, shared expert)
    "mixtral-llama": ("llama", "MixtralForCausalLM", False),
    "mixtral-llama-tied": ("llama_tied", "MixtralForCausalLM", False),
    "qwen2_moe-qwen2-tied": ("qwen2", "Qwen2MoeForCausalLM", True),
    "qwen2_moe-llama": ("llama", "Qwen2MoeForCausalLM", True),
    "qwen3_moe-qwen3": ("qwen3", "Qwen3MoeForCausalLM", False),
    # mistral's sliding window carries over
    "mixtral-mistral": ("mistral", "MixtralForCausalLM", False),
    "qwen2_moe-mistral": ("mistral", "Qwen2MoeForCausalLM", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_matches_transformers_layout_and_loads(case, request, tmp_path):
    import torch

    fixture, cls, shared = CASES[case]
    fam = request.getfixturevalue(fixture)
    text = expert_yaml(
        fam["base"], [fam["ft1"], fam["ft2"]], shared=fam["ft1"] if shared else None, extra="dtype: bfloat16"
    )
    out, result = build(tmp_path, text)
    assert result.hf_class == cls
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls] and cfg["num_experts_per_tok"] == 2
    ours = header(out)
    assert ours == transformers_layout(out, tmp_path)
    if "tied" in case:
        assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours
    if "mistral" in case:
        assert model_window(cfg) == 64
    model = load(out)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    assert torch.isfinite(model(ids).logits).all()
    if "tied" in case:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def model_window(cfg: dict) -> int | None:
    if cfg["model_type"] == "qwen2_moe":
        assert cfg["use_sliding_window"] and set(cfg["layer_types"]) == {"sliding_attention"}
    return cfg["sliding_window"]


def _expert_names(cls: str, layer: int, e: int) -> dict[str, str]:
    if cls == "MixtralForCausalLM":
        w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
        return {p: f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w[p]}.weight" for p in w}
    return {p: f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize(
    "fixture,cls", [("llama", "MixtralForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")]
)
def test_expert_weights_are_the_source_mlps(fixture, cls, request, tmp_path):
    import torch

    fam = request.getfixturevalue(fixture)
    experts = [fam["ft1"], fam["ft2"], fam["ft3"]]
    text = expert_yaml(fam["base"], experts, shared=fam["ft3"] if cls.startswith("Qwen2") else None)
    text = text.replace(
        f"  - source_model: {fam['ft2']}\n", f"  - source_model: {fam['ft2']}\n    residual_scale: 0.5\n", 1
    )
    out, _ = build(tmp_path, text)
    got = tensors(out)
    base = tensors(fam["base"])
    n = json.loads((fam["base"] / "config.json").read_text())["num_hidden_layers"]
    for e, src in enumerate(experts):
        theirs = tensors(src)
        for layer in range(n):
            for part, name in _expert_names(cls, layer, e).items():
                want = theirs[f"model.layers.{layer}.mlp.{part}.weight"]
                if e == 1 and part == "down_proj":
                    want = want * 0.5
                assert torch.equal(got[name], want), name
    if cls.startswith("Qwen2"):
        shared = tensors(fam["ft3"])
        for layer in range(n):
            for part in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(
                    got[f"model.layers.{layer}.mlp.shared_expert.{part}.weight"],
                    shared[f"model.layers.{layer}.mlp.{part}.weight"],
                )
            assert got[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].shape == (
                1,
                base["model.embed_tokens.weight"].shape[1],
            )
    # everything else is the base's, bit for bit
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name


def _hidden_entering(base_dir: Path, prompt: str):
    """[layers, hidden]: the residual stream entering each layer at the last token of ``prompt``
    (bos in front), computed with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hs[:-1]])


ROUTED_CASES = {
    # output: (family fixture, extra YAML, shared expert, router tensor of layer L)
    "mixtral": ("llama", "", False, "model.layers.{}.block_sparse_moe.gate.weight"),
    "qwen2_moe": ("llama", "", True, "model.layers.{}.mlp.gate.weight"),
    "qwen3_moe": ("qwen3", "", False, "model.layers.{}.mlp.gate.weight"),
    "deepseek": ("llama", "architecture: deepseek", False, "model.layers.{}.mlp.gate.weight"),
}


@pytest.mark.parametrize("output", list(ROUTED_CASES))
def test_hidden_gates_route_each_experts_prompts_to_it(output, request, tmp_path):
    import torch

    fixture, extra, shared, router = ROUTED_CASES[output]
    fam = request.getfixturevalue(fixture)
    experts = [fam["ft1"], fam["ft2"], fam["ft3"]]
    text = expert_yaml(fam["base"], experts, gate_mode="hidden", shared=fam["ft1"] if shared else None, extra=extra)
    out, result = build(tmp_path, text, batch_size=3)
    assert result.architecture == output
    got = tensors(out)
    router0 = got[router.format(0)]
    hidden_size = json.loads((fam["base"] / "config.json").read_text())["hidden_size"]
    assert router0.shape == (3, hidden_size)
    hidden = {e: [_hidden_entering(fam["base"], p) for p in prompts_of(WORDS[e])] for e in range(3)}
    for e in range(3):
        logits = torch.stack([router0 @ h[0] for h in hidden[e]])  # [prompts, experts]
        assert (logits.argmax(-1) == e).float().mean() > 0.5
        own = logits[:, e].mean()
        assert all(own > logits[:, o].mean() for o in range(3) if o != e)
    # the gate math itself: mean over prompts of the last-token state, L2-normalized, per layer
    for e in range(3):
        mean = torch.stack(hidden[e]).mean(0)
        want = mean / mean.norm(dim=-1, keepdim=True)
        for layer in range(4):
            torch.testing.assert_close(got[router.format(layer)][e], want[layer], atol=1e-4, rtol=1e-4)


def test_prompts_the_tokenizer_drops_are_an_error(qwen2, tmp_path):
    """transformers loads the tiny qwen2 word-level vocabulary as a byte-level Qwen2Tokenizer,
    which encodes 'w3 w4 w5' to nothing: that must stop the build, not give equal gates."""
    from mergekitty.errors import ModelFormatError

    text = expert_yaml(qwen2["base"], [qwen2["ft1"], qwen2["ft2"]], gate_mode="hidden", shared=qwen2["ft3"])
    with pytest.raises(ModelFormatError, match="turns the prompt 'w3 w4 w5' into no tokens"):
        build(tmp_path, text)
    assert not (tmp_path / "out" / "config.json").exists()


def test_hidden_avg_and_negative_prompts(llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], gate_mode="hidden_avg")
    text = text.replace(
        f"  - source_model: {llama['ft1']}\n",
        f"  - source_model: {llama['ft1']}\n    negative_prompts: ['w70 w71 w72']\n",
        1,
    )
    out, _ = build(tmp_path, text, batch_size=2)
    got = tensors(out)
    tok = AutoTokenizer.from_pretrained(llama["base"])
    model = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)

    def avg(prompt):
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        return torch.stack([h[0].mean(0) for h in hs[:-1]])

    v = torch.stack([avg(p) for p in prompts_of(WORDS[0])]).mean(0) - avg("w70 w71 w72")
    want = v / v.norm(dim=-1, keepdim=True)
    for layer in range(4):
        torch.testing.assert_close(
            got[f"model.layers.{layer}.block_sparse_moe.gate.weight"][0], want[layer], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_batching_and_padding_do_not_change_the_gates(mode, llama, tmp_path):
    import torch

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], gate_mode=mode)
    # prompts of different lengths, so that batched prompts are padded
    text = text.replace('"w3 w4 w5"', '"w3"').replace('"w30 w31 w32"', '"w30 w31 w32 w33 w34 w35 w36"')
    routers = []
    for batch in (1, 4):
        out, _ = build(tmp_path, text, name=f"b{batch}", batch_size=batch)
        routers.append(torch.stack([tensors(out)[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(4)]))
    torch.testing.assert_close(routers[0], routers[1], atol=1e-5, rtol=1e-5)


def test_cheap_embed_gates_come_from_the_embedding_table(llama, tmp_path):
    import torch
    from transformers import AutoTokenizer

    out, _ = build(tmp_path, expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], gate_mode="cheap_embed"))
    got = tensors(out)
    emb = tensors(llama["base"])["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(llama["base"])
    for e in range(2):
        v = sum(
            emb[[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]].sum(0) for p in prompts_of(WORDS[e])
        )
        for layer in range(4):
            torch.testing.assert_close(
                got[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e], v / v.norm(), atol=1e-5, rtol=1e-5
            )


def _base_with_embedding_in(base: Path, dtype: str, out: Path) -> Path:
    """A copy of ``base`` whose embedding table is stored in ``dtype`` (the rest as it was)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if dtype == "float32":
        return base
    shutil.copytree(base, out)
    state = load_file(out / "model.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(getattr(torch, dtype))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("embedding_dtype", ["float32", "bfloat16"])
def test_cheap_embed_gates_are_the_formula(embedding_dtype, llama, tmp_path):
    """Against the formula in float64 numpy, and bit for bit against the torch computation
    earlier versions did (sum over each prompt's rows, summed over prompts, normalized)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    base = _base_with_embedding_in(llama["base"], embedding_dtype, tmp_path / "base")
    long_prompt = " ".join(f"w{i}" for i in range(3, 40))  # more than 16 tokens: the cascade's first step
    text = expert_yaml(base, [llama["ft1"], llama["ft2"]], gate_mode="cheap_embed", extra="dtype: float32")
    text = text.replace('"w3 w4 w5"', json.dumps(long_prompt)).replace(
        f"  - source_model: {llama['ft2']}\n",
        f'  - source_model: {llama["ft2"]}\n    negative_prompts: ["w70 w71", "w80"]\n',
    )
    out, _ = build(tmp_path, text)
    routers = np.stack([tensors(out)[f"model.layers.{i}.block_sparse_moe.gate.weight"].numpy() for i in range(4)])
    emb = tensors(base)["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(llama["base"])

    def ids(p: str) -> list[int]:
        return [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]

    positive = [[long_prompt, *prompts_of(WORDS[0])[1:]], prompts_of(WORDS[1])]
    negative = [[], ["w70 w71", "w80"]]
    table = emb.to(torch.float32).numpy().astype(np.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's own column grouping depends on its thread count
    try:
        for e in range(2):
            v = sum(table[ids(p)].sum(0) for p in positive[e]) - sum(
                (table[ids(p)].sum(0) for p in negative[e]), np.zeros(64)
            )
            want = v / np.linalg.norm(v)
            old = torch.zeros(64)
            for p in positive[e]:
                old += emb[ids(p)].to(torch.float32).sum(0)
            if negative[e]:
                neg = torch.zeros(64)
                for p in negative[e]:
                    neg += emb[ids(p)].to(torch.float32).sum(0)
                old = old - neg
            old = old / old.norm()
            for layer in range(4):
                np.testing.assert_allclose(routers[layer, e], want, rtol=0, atol=1e-6)
                assert np.array_equal(routers[layer, e], old.numpy())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_follow_the_seed(mode, llama, tmp_path):
    import torch

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], gate_mode=mode, prompts=False)
    routers = []
    for i, seed in enumerate((7, 7, 8)):
        out, result = build(tmp_path, text, name=f"out{i}", random_seed=seed)
        assert result.seed == seed
        routers.append(tensors(out)["model.layers.2.block_sparse_moe.gate.weight"])
        assert "--random-seed" in (out / "mergekitty_moe_config.yml").read_text()
    assert torch.equal(routers[0], routers[1])
    assert not torch.equal(routers[0], routers[2])
    if mode == "uniform_random":
        assert routers[0].abs().max() <= 64**-0.5


def test_noise_is_seeded_and_shaped(llama, tmp_path):
    import torch

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False).replace(
        f"  - source_model: {llama['ft1']}\n", f"  - source_model: {llama['ft1']}\n    noise_scale: 0.1\n", 1
    )
    a, _ = build(tmp_path, text, name="a", random_seed=3)
    b, _ = build(tmp_path, text, name="b", random_seed=3)
    name = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    ta, tb = tensors(a)[name], tensors(b)[name]
    assert torch.equal(ta, tb)
    diff = ta - tensors(llama["ft1"])["model.layers.1.mlp.gate_proj.weight"]
    assert 0.05 < diff.std() < 0.2
    assert torch.equal(
        tensors(a)["model.layers.1.block_sparse_moe.experts.1.w1.weight"],
        tensors(llama["ft2"])["model.layers.1.mlp.gate_proj.weight"],
    )


def box_muller(seed: int, stream: str, i: int) -> float:
    """Normal draw ``i`` of ``stream`` as moe/draws.py documents it, in plain Python."""
    import math

    from mergekitty.ops.random import uniform_scalar

    u1 = uniform_scalar(seed, stream + "#radius", i)
    u2 = uniform_scalar(seed, stream + "#angle", i)
    return math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2)


def test_noise_is_the_documented_stream_per_tensor(llama, tmp_path):
    import numpy as np

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False).replace(
        f"  - source_model: {llama['ft1']}\n", f"  - source_model: {llama['ft1']}\n    noise_scale: 0.1\n", 1
    )
    out, _ = build(tmp_path, text, random_seed=3)
    name = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    diff = (tensors(out)[name] - tensors(llama["ft1"])["model.layers.1.mlp.down_proj.weight"]).flatten()
    want = [0.1 * box_muller(3, "moe.noise:" + name, i) for i in range(20)]
    np.testing.assert_allclose(diff[:20].numpy(), want, atol=1e-6)


def test_random_gates_are_the_documented_streams(llama, tmp_path):
    """Routed gates from stream moe.gates.routed, the shared expert's gate from moe.gates.shared."""
    import numpy as np

    text = expert_yaml(
        llama["base"], [llama["ft1"], llama["ft2"]], shared=llama["ft3"], prompts=False, extra="dtype: float32"
    )
    out, result = build(tmp_path, text, random_seed=11)
    assert result.architecture == "qwen2_moe"
    got = tensors(out)
    routed = np.stack([got[f"model.layers.{i}.mlp.gate.weight"].numpy() for i in range(4)])  # [4, 2, 64]
    shared = np.stack([got[f"model.layers.{i}.mlp.shared_expert_gate.weight"].numpy() for i in range(4)])
    flat = routed.reshape(-1)
    for i in (0, 1, 63, 64, 200, flat.size - 1):
        np.testing.assert_allclose(flat[i], box_muller(11, "moe.gates.routed", i), rtol=1e-6, atol=1e-7)
    # the shared gate of layer L is row 0 of [layers, 1, hidden]: draws L * 64 ..
    np.testing.assert_allclose(shared[2, 0, 5], box_muller(11, "moe.gates.shared", 2 * 64 + 5), rtol=1e-6, atol=1e-7)
    assert abs(flat.mean()) < 0.15 and abs(flat.std() - 1) < 0.1  # 512 standard normal draws


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_have_the_scale_of_their_mode(mode):
    """Standard normal entries, or uniform in [-1/sqrt(hidden), 1/sqrt(hidden)) (nn.Linear's init)."""
    import numpy as np

    from mergekitty.moe.gates import random_gates

    g = random_gates(mode, 4, 8, 256, 5, "moe.gates.routed")
    assert g.shape == (4, 8, 256) and g.dtype == np.float32
    assert np.array_equal(g, random_gates(mode, 4, 8, 256, 5, "moe.gates.routed"))
    assert not np.array_equal(g, random_gates(mode, 4, 8, 256, 6, "moe.gates.routed"))
    x = g.astype(np.float64).reshape(-1)  # 8192 draws
    if mode == "random":
        assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.03
    else:
        bound = 256**-0.5
        assert x.min() >= -bound and x.max() < bound
        assert x.min() < -0.99 * bound and x.max() > 0.99 * bound
        assert abs(x.mean()) < 0.02 * bound and abs(x.std() - bound / 3**0.5) < 0.02 * bound


def test_a_negative_seed_is_refused(llama, tmp_path):
    from mergekitty.errors import InvalidArgumentError

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False)
    with pytest.raises(InvalidArgumentError, match="--random-seed must be between 0 and 2\\*\\*64 - 1, got -1"):
        build(tmp_path, text, random_seed=-1)
    assert not (tmp_path / "out").exists()


def test_shards_and_tokenizer_options(llama, tmp_path):
    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False)
    out, _ = build(tmp_path, text, out_shard_size=200_000, copy_tokenizer=False)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "tokenizer.json").exists()
    load(out)


# --------------------------------------------------------------------------- choosing the output


def test_no_architecture_fits_says_why_for_each(llama, family_root, tmp_path):
    from mergekitty.errors import ArchitectureError
    from mergekitty.tiny_models import make_model

    wide = family_root / "llama-wide-mlp"
    if not (wide / "config.json").exists():
        make_model(wide, "llama", seed=5, intermediate_size=96)
    with pytest.raises(ArchitectureError) as err:
        build(tmp_path, expert_yaml(llama["base"], [llama["ft1"], wide], prompts=False))
    msg = str(err.value)
    assert "intermediate sizes differ" in msg and all(
        f"{n}:" in msg for n in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek")
    )
    assert "\n" not in msg


def test_shared_expert_cannot_go_into_mixtral(llama, tmp_path):
    from mergekitty.errors import ArchitectureError

    text = expert_yaml(
        llama["base"], [llama["ft1"], llama["ft2"]], shared=llama["ft3"], prompts=False, extra="architecture: mixtral"
    )
    with pytest.raises(ArchitectureError, match="mixtral: has no shared experts"):
        build(tmp_path, text)
    # without the architecture key the shared expert picks Qwen2-MoE
    _, result = build(tmp_path, text.replace("architecture: mixtral\n", ""))
    assert result.architecture == "qwen2_moe"


def test_deepseek_and_qwen3_explain_themselves(llama, qwen2, tmp_path):
    from mergekitty.errors import ArchitectureError

    with pytest.raises(ArchitectureError, match="deepseek: takes llama / mistral models only"):
        build(
            tmp_path,
            expert_yaml(qwen2["base"], [qwen2["ft1"], qwen2["ft2"]], prompts=False, extra="architecture: deepseek"),
        )
    with pytest.raises(ArchitectureError, match="qwen3_moe: takes qwen3 models only"):
        build(
            tmp_path,
            expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False, extra="architecture: qwen3"),
        )
    # qwen2 attention has biases: not Mixtral, and without a shared expert not Qwen2-MoE either
    with pytest.raises(ArchitectureError, match="mixtral: .*biases.*qwen2_moe: needs exactly one shared expert"):
        build(tmp_path, expert_yaml(qwen2["base"], [qwen2["ft1"], qwen2["ft2"]], prompts=False))


def test_identical_experts_need_the_flag(llama, tmp_path):
    from mergekitty.errors import ConfigError

    text = expert_yaml(llama["base"], [llama["ft1"], llama["ft1"]], prompts=False)
    with pytest.raises(ConfigError, match="same model"):
        build(tmp_path, text)
    _, result = build(tmp_path, text, allow_untrained=True)
    assert result.architecture == "mixtral"


# --------------------------------------------------------------------------- config errors


def test_config_validation_messages():
    from mergekitty.errors import ConfigError
    from mergekitty.moe import load_moe_config

    ok = "base_model: ./b\ngate_mode: random\nexperts:\n  - source_model: ./a\n  - source_model: ./c\n"
    assert load_moe_config(ok).experts_per_token == 2
    # a key no build reads is ignored, as mergekit-moe ignores it, and reported
    (ignored,) = load_moe_config(ok + "experts_per_tokn: 2\n").ignored_keys
    assert (
        ignored.key == "experts_per_tokn" and ignored.line == 6 and "did you mean 'experts_per_token'" in str(ignored)
    )
    cases = {
        ok.replace("gate_mode: random", "gate_mode: hiden"): ("gate_mode", "did you mean 'hidden'"),
        ok + "experts_per_token: 3\n": ("experts_per_token", "only 2 expert(s)"),
        ok.replace("gate_mode: random", "gate_mode: hidden"): ("experts[0]", "no positive_prompts"),
        ok + "architecture: mixtrel\n": ("architecture", "did you mean 'mixtral'"),
        ok.replace("  - source_model: ./a\n", "  - source_modle: ./a\n"): (
            "experts[0].source_modle",
            "did you mean 'source_model'",
        ),
        ok + "dtype: float8\n": ("dtype", "unsupported dtype"),
    }
    for text, (key, words) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_moe_config(text, source="moe.yml")
        assert err.value.key == key and words in str(err.value), str(err.value)
        assert str(err.value).startswith("moe.yml:"), str(err.value)
    same = "base_model: ./b\nexperts:\n  - source_model: ./a\n    positive_prompts: [x]\n  - source_model: ./c\n    positive_prompts: [x]\n"
    with pytest.raises(ConfigError, match="same prompts"):
        load_moe_config(same)


@pytest.mark.parametrize(
    "edit,words",
    [
        (
            lambda t: t.replace("experts_per_token", "experts_per_tokn"),
            "moe.yml:3, key 'experts_per_tokn': 'experts_per_tokn' is not a config key here; did you mean 'experts_per_token'? (strict mode",
        ),
        (lambda t: t.replace("gate_mode: random", "gate_mode: cheap"), "unknown gate_mode 'cheap'"),
        (lambda t: t.replace("/ft2", "/ft9"), "key 'experts[1].source_model': model directory not found"),
    ],
    ids=["key-typo", "gate-mode", "missing-model"],
)
def test_cli_config_errors_are_one_clear_line(edit, words, llama, tmp_path):
    cfg = tmp_path / "moe.yml"
    cfg.write_text(edit(expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], prompts=False)))
    proc = run_cli("mergekitty-moe", cfg, tmp_path / "out", "--quiet", "--strict", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_builds_and_loads(llama, tmp_path):
    import torch

    cfg = tmp_path / "moe.yml"
    cfg.write_text(expert_yaml(llama["base"], [llama["ft1"], llama["ft2"], llama["ft3"]], gate_mode="hidden"))
    out = tmp_path / "out"
    proc = run_cli(
        "mergekitty-moe", cfg, out, "--device", "cpu", "--batch-size", "2", "--random-seed", "1",
        "--out-shard-size", "1G", "--no-copy-tokenizer", "--trust-remote-code",
    )  # fmt: skip
    assert "MixtralForCausalLM" in proc.stderr
    model = load(out)
    assert torch.isfinite(model(torch.tensor([[1, 4, 8]])).logits).all()
    assert not (out / "tokenizer.json").exists()


def test_cli_random_gates_report_their_seed(llama, tmp_path):
    import re

    cfg = tmp_path / "moe.yml"
    cfg.write_text(expert_yaml(llama["base"], [llama["ft1"], llama["ft2"]], gate_mode="random", prompts=False))
    proc = run_cli("mergekitty-moe", cfg, tmp_path / "out", "--i-understand-this-is-not-useful-without-training")
    seed = re.search(r"random seed: (\d+)", proc.stderr).group(1)
    assert f"--random-seed {seed}" in (tmp_path / "out" / "mergekitty_moe_config.yml").read_text()
    assert "needs training" not in proc.stderr  # the flag silences the warning


def test_model_plus_lora_experts_and_base(llama, tmp_path):
    """``model+adapter`` references work for experts and the base: with a full-rank adapter of
    ft2 on the base, the MoE equals the one built from ft2 itself (routers from hidden states too)."""
    import torch

    from mergekitty.lora import extract_lora

    adapter = tmp_path / "ft2-adapter"
    extract_lora(llama["ft2"], llama["base"], adapter, rank=64)
    adapted = f"{llama['base']}+{adapter}"
    for gate_mode, base_ref in (("random", llama["base"]), ("hidden", adapted)):
        via_lora = expert_yaml(base_ref, [llama["ft1"], adapted], gate_mode=gate_mode)
        direct = expert_yaml(
            llama["ft2"] if base_ref == adapted else llama["base"], [llama["ft1"], llama["ft2"]], gate_mode=gate_mode
        )
        got, _ = build(tmp_path, via_lora, name=f"lora-{gate_mode}")
        want, _ = build(tmp_path, direct, name=f"direct-{gate_mode}")
        a, b = tensors(got), tensors(want)
        assert set(a) == set(b)
        for name in b:
            torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
