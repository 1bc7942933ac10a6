"""Architecture matrix: tiny random models of every common family, built from transformers configs,
merged through the ``mergekitty-yaml`` command with linear, ties and a passthrough frankenmerge.

Each output must load with transformers and give finite logits; linear outputs must equal the
weighted average of the inputs' state dicts (and give the same logits as a model built from that
average in torch); frankenmerges must renumber the layers and rewrite the layer count and the
per-layer config lists (``layer_types``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import load_model, model_logits, read_state, run_yaml
from mergekitty.tiny_models import SMALL_ARCHS

ARCHS = ("llama", "mistral", "qwen2") + SMALL_ARCHS
# the families the fast selection merges (a decoder and a vision-language model); the rest are slow
FAST_ARCHS = ("llama", "gemma3_vl")
ARCH_PARAMS = [pytest.param(a, marks=() if a in FAST_ARCHS else pytest.mark.slow) for a in ARCHS]
# transformers config classes each family needs; a family whose class is missing is skipped
_CONFIG_CLASS = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config",
    "gpt_neox": "GPTNeoXConfig", "gpt2": "GPT2Config", "falcon": "FalconConfig", "starcoder2": "Starcoder2Config",
    "stablelm": "StableLmConfig", "cohere": "CohereConfig", "olmo2": "Olmo2Config", "mixtral": "MixtralConfig",
    "qwen3_moe": "Qwen3MoeConfig", "gemma3_vl": "Gemma3Config", "llava": "LlavaConfig",
}  # fmt: skip
# the frankenmerge: [0, 2) + [1, 4) of a 4-layer model
SLICES = ((0, 2), (1, 4))
LAYER_MAP = [0, 1, 1, 2, 3]


def _franken_yaml(
    tmp_path: Path, model: Path, slices: tuple[tuple[int, int], ...] = ((0, 2), (1, 3)), extra: str = ""
) -> Path:
    """A passthrough frankenmerge config of ``model``'s layer ranges ``slices``."""
    cfg = tmp_path / "franken.yml"
    cfg.write_text(
        "slices:\n"
        + "".join(f"  - sources: [{{model: {model}, layer_range: [{a}, {b}]}}]\n" for a, b in slices)
        + "merge_method: passthrough\n"
        + extra
    )
    return cfg


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """arch -> {base, ft1, ft2}; each family is built once per session, on first use."""
    root = tmp_path_factory.mktemp("arch_families")
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        import transformers

        if not hasattr(transformers, _CONFIG_CLASS[arch]):
            pytest.skip(f"transformers {transformers.__version__} has no {_CONFIG_CLASS[arch]}")
        if arch not in built:
            from mergekitty.tiny_models import make_family

            overrides = {"hidden_size": 32, "intermediate_size": 64} if arch in ("llama", "mistral", "qwen2") else {}
            paths = make_family(root / arch, arch, 2, **overrides)
            built[arch] = dict(zip(("base", "ft1", "ft2"), paths))
        return built[arch]

    return get


def _count_key(cfg: dict) -> tuple[dict, str]:
    """(the dict holding the language model's layer count, the key)"""
    from mergekitty.architecture import layer_count_key

    key = layer_count_key(cfg)
    node = cfg
    for part in key.split(".")[:-1]:
        node = node[part]
    return node, key.split(".")[-1]


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_linear(arch, families, tmp_path):
    fam = families(arch)
    cfg = tmp_path / "linear.yml"
    cfg.write_text(f"""
models:
  - model: {fam["ft1"]}
    parameters: {{weight: 0.6}}
  - model: {fam["ft2"]}
    parameters: {{weight: 0.4}}
merge_method: linear
dtype: float32
""")
    out = tmp_path / "out"
    run_yaml(cfg, out)
    s1, s2, got = read_state(fam["ft1"]), read_state(fam["ft2"]), read_state(out)
    expected = {k: 0.6 * s1[k].double() + 0.4 * s2[k].double() for k in s1}
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], atol=1e-6, rtol=1e-6, msg=k)
    # a model whose weights were averaged in torch, saved next to the donor's config
    from safetensors.torch import save_file

    ref = tmp_path / "ref"
    ref.mkdir()
    save_file(
        {k: v.float().contiguous() for k, v in expected.items()},
        str(ref / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (ref / "config.json").write_text((fam["ft1"] / "config.json").read_text())
    logits = model_logits(out)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model_logits(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_ties(arch, families, tmp_path):
    fam = families(arch)
    cfg = tmp_path / "ties.yml"
    cfg.write_text(f"""
base_model: {fam["base"]}
models:
  - model: {fam["ft1"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {fam["ft2"]}
    parameters: {{weight: 0.8, density: 0.5}}
merge_method: ties
dtype: float32
random_seed: 1
""")
    out = tmp_path / "out"
    run_yaml(cfg, out)
    base, got = read_state(fam["base"]), read_state(out)
    assert set(got) == set(base)
    assert any(not torch.equal(got[k], base[k]) for k in base)
    assert torch.isfinite(model_logits(out)).all()


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_frankenmerge(arch, families, tmp_path):
    fam = families(arch)
    src = fam["ft1"]
    out = tmp_path / "out"
    run_yaml(_franken_yaml(tmp_path, src, SLICES, "dtype: float32\n"), out)

    in_cfg = json.loads((src / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    in_parent, key = _count_key(in_cfg)
    out_parent, _ = _count_key(out_cfg)
    assert in_parent[key] == 4 and out_parent[key] == len(LAYER_MAP)
    for list_key, value in in_parent.items():  # per-layer lists (layer_types...) follow the slices
        if isinstance(value, list) and len(value) == 4:
            assert out_parent[list_key] == [value[i] for i in LAYER_MAP], list_key
    if "vision_config" in in_cfg:  # only the language tower is sliced
        assert out_cfg["vision_config"] == in_cfg["vision_config"]

    from mergekitty.architecture import infer_layout

    s_in, got = read_state(src), read_state(out)
    layout = infer_layout(s_in, in_cfg)
    assert layout.num_layers == 4
    if "vision_config" in in_cfg:  # the language layers are renumbered, the vision tower's are not
        assert "language_model" in layout.prefix, layout.prefix
        assert any(".vision_tower." in f".{k}" and ".layers.3." in k for k in got) == (
            in_cfg["vision_config"]["num_hidden_layers"] == 4
        )
    expected = {k: v for k, v in s_in.items() if not k.startswith(layout.prefix + ".")}
    for out_idx, in_idx in enumerate(LAYER_MAP):
        for suffix in layout.layer_tensors[in_idx]:
            expected[layout.layer_name(out_idx, suffix)] = s_in[layout.layer_name(in_idx, suffix)]
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k

    model = load_model(out)
    assert model.config.get_text_config().num_hidden_layers == len(LAYER_MAP)
    logits = model_logits(out)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "dense_layers,want_dense",
    [({"mlp_only_layers": [1]}, [1, 2]), ({"decoder_sparse_step": 2}, [0, 3])],
    ids=["mlp_only_layers", "decoder_sparse_step"],
)
def test_frankenmerge_renumbers_dense_layer_indices(dense_layers, want_dense, tmp_path):
    """A Qwen3-MoE whose dense-MLP layers are given by index (or by stride): after slicing, the
    output's ``mlp_only_layers`` names the output layers that came from dense ones."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=3, num_experts_per_tok=2, vocab_size=96, **dense_layers,
    )  # fmt: skip
    src = tmp_path / "src"
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(src)
    out = tmp_path / "out"
    run_yaml(_franken_yaml(tmp_path, src, SLICES), out)
    out_cfg = json.loads((out / "config.json").read_text())
    assert out_cfg["num_hidden_layers"] == len(LAYER_MAP)
    assert out_cfg["mlp_only_layers"] == want_dense and out_cfg.get("decoder_sparse_step", 1) == 1
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.parametrize("arch,expert_key", [("mixtral", "block_sparse_moe.experts"), ("qwen3_moe", "mlp.experts")])
def test_moe_experts_merge_one_by_one(arch, expert_key, families):
    """save_pretrained writes one tensor per expert; every expert is its own tensor job."""
    from mergekitty.api import plan_merge

    fam = families(arch)
    plan = plan_merge(f"""
models:
  - model: {fam["ft1"]}
  - model: {fam["ft2"]}
merge_method: linear
parameters: {{weight: 1.0}}
""")
    names = {j.out_name for j in plan.jobs}
    for layer in range(4):
        for e in range(3):
            assert any(n.startswith(f"model.layers.{layer}.{expert_key}.{e}.") for n in names), (layer, e)
    assert all(j.shape[0] <= 64 for j in plan.jobs if ".experts." in j.out_name)


def test_different_architectures_need_allow_crimes(families, tmp_path, capsys):
    """Llama and Mistral of equal sizes have the same tensor names and shapes; merging them is a crime."""
    llama, mistral = families("llama"), families("mistral")
    cfg = tmp_path / "crime.yml"
    cfg.write_text(f"""
models:
  - model: {llama["ft1"]}
  - model: {mistral["ft1"]}
merge_method: linear
parameters: {{weight: 0.5}}
""")
    assert run_yaml(cfg, tmp_path / "no", check=False) == 1
    err = capsys.readouterr().err
    assert "MistralForCausalLM" in err and "LlamaForCausalLM" in err and "--allow-crimes" in err
    assert not (tmp_path / "no" / "config.json").exists()
    assert run_yaml(cfg, tmp_path / "yes", "--allow-crimes", check=False) == 0
    assert torch.isfinite(model_logits(tmp_path / "yes")).all()


def test_tied_and_untied_heads_merge(families, tmp_path):
    """An untied Falcon (lm_head.weight) merged with a tied one: the tied model's head is its
    transformer.word_embeddings."""
    from safetensors.torch import save_file

    tied = families("falcon")["ft2"]
    untied = tmp_path / "untied"
    untied.mkdir()
    state = read_state(families("falcon")["ft1"])
    head = state["transformer.word_embeddings.weight"] + 0.05 * torch.randn_like(
        state["transformer.word_embeddings.weight"]
    )
    state["lm_head.weight"] = head
    save_file(state, str(untied / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    cfg = tmp_path / "mix.yml"
    cfg.write_text(f"""
base_model: {untied}
models:
  - model: {untied}
  - model: {tied}
merge_method: linear
parameters: {{weight: 0.5}}
dtype: float32
""")
    out = tmp_path / "out"
    run_yaml(cfg, out)
    got, other = read_state(out), read_state(tied)
    torch.testing.assert_close(got["lm_head.weight"], 0.5 * head + 0.5 * other["transformer.word_embeddings.weight"])
    assert torch.isfinite(model_logits(out)).all()


# ------------------------------------------------------------------ layout override files
def _odd_model(path: Path, depth: int = 3) -> Path:
    """A model no transformers class knows: its trunk.blocks stack and a second numbered group
    (trunk.aux) look alike, and config.json names its layer count 'depth'."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(depth)
    state = {
        "tok_table.weight": torch.randn(16, 8, generator=g),
        "final.scale": torch.randn(8, generator=g),
        "readout.weight": torch.randn(16, 8, generator=g),
    }
    for i in range(depth):
        state[f"trunk.blocks.{i}.mix.weight"] = torch.randn(8, 8, generator=g)
        state[f"trunk.blocks.{i}.ff.weight"] = torch.randn(8, 8, generator=g)
        state[f"trunk.aux.{i}.weight"] = torch.randn(4, generator=g)
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architectures": ["OddNet"], "model_type": "oddnet", "depth": depth}))
    return path


_ODD_LAYOUT = {
    "layer_prefix": "trunk.blocks",
    "num_layers_key": "depth",
    "pre": ["tok_table.*", "trunk.aux.*"],
    "post": ["final.*", "readout.weight"],
}


def test_unknown_layout_is_an_error_naming_the_tensors(tmp_path):
    from mergekitty.api import plan_merge
    from mergekitty.errors import ArchitectureError

    odd = _odd_model(tmp_path / "odd")
    with pytest.raises(
        ArchitectureError,
        match=r"trunk\.blocks.*trunk\.aux.*mergekitty_layout\.json|trunk\.aux.*trunk\.blocks.*mergekitty_layout\.json",
    ):
        plan_merge(_franken_yaml(tmp_path, odd))


def test_layout_file_next_to_the_model(tmp_path):
    from mergekitty.api import plan_merge

    odd = _odd_model(tmp_path / "odd")
    (odd / "mergekitty_layout.json").write_text(json.dumps(_ODD_LAYOUT))
    out = tmp_path / "out"
    run_yaml(_franken_yaml(tmp_path, odd), out)
    assert json.loads((out / "config.json").read_text())["depth"] == 4
    s_in, got = read_state(odd), read_state(out)
    for out_idx, in_idx in enumerate([0, 1, 1, 2]):
        for part in ("mix", "ff"):
            assert torch.equal(
                got[f"trunk.blocks.{out_idx}.{part}.weight"], s_in[f"trunk.blocks.{in_idx}.{part}.weight"]
            )
    assert not any(k.startswith("trunk.blocks.4.") for k in got)
    for k in ("tok_table.weight", "final.scale", "readout.weight", "trunk.aux.2.weight"):
        assert torch.equal(got[k], s_in[k])
    # the output carries the layout file, so it can be merged again
    assert json.loads((out / "mergekitty_layout.json").read_text()) == _ODD_LAYOUT
    assert plan_merge(_franken_yaml(tmp_path, out)).models[0].num_layers == 4


def test_layout_override_option_yaml(tmp_path):
    odd = _odd_model(tmp_path / "odd")
    layout = tmp_path / "layout.yml"
    layout.write_text(
        "layer_prefix: trunk.blocks\nnum_layers_key: depth\npre: ['tok_table.*', 'trunk.aux.*']\npost: ['final.*', 'readout.*']\n"
    )
    out = tmp_path / "out"
    run_yaml(_franken_yaml(tmp_path, odd), out, "--layout-override", str(layout))
    assert json.loads((out / "config.json").read_text())["depth"] == 4


@pytest.mark.parametrize(
    "layout,message",
    [
        ({**_ODD_LAYOUT, "post": ["final.*"]}, r"match neither 'pre' nor 'post': readout\.weight"),
        ({**_ODD_LAYOUT, "layer_prefix": "trunk.layers"}, r"no tensor is named 'trunk\.layers\.<N>"),
        ({**_ODD_LAYOUT, "num_layers_key": "n_layers"}, r"no integer 'n_layers'"),
        ({**_ODD_LAYOUT, "layers": "x"}, r"unknown key\(s\) 'layers'; expected"),
    ],
)
def test_bad_layout_files(tmp_path, layout, message):
    from mergekitty.api import plan_merge
    from mergekitty.errors import ArchitectureError

    odd = _odd_model(tmp_path / "odd")
    (odd / "mergekitty_layout.json").write_text(json.dumps(layout))
    with pytest.raises(ArchitectureError, match=message):
        plan_merge(_franken_yaml(tmp_path, odd))


def _to_other_scheme(src: Path, dst: Path) -> None:
    """A copy of the VLM checkpoint ``src`` with every tensor under the other naming scheme."""
    import shutil

    from safetensors.torch import save_file

    from mergekitty.architecture.layout import other_spellings

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    state = read_state(src)
    renamed = {(other_spellings(k) or [k])[0]: v.contiguous() for k, v in state.items()}
    assert len(renamed) == len(state) and set(renamed) != set(state)
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", [pytest.param("llava", marks=pytest.mark.slow), "gemma3_vl"])
def test_vlm_checkpoints_of_both_naming_schemes_merge(arch, families, tmp_path):
    from mergekitty.architecture.layout import other_spellings

    fam = families(arch)
    other = tmp_path / "ft1-other-scheme"
    _to_other_scheme(fam["ft1"], other)
    a, b = read_state(fam["base"]), read_state(fam["ft1"])
    for donor, second in ((fam["base"], other), (other, fam["base"])):
        cfg = tmp_path / "linear.yml"
        cfg.write_text(
            f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {donor}\n    parameters: {{weight: 0.5}}\n  - model: {second}\n    parameters: {{weight: 0.5}}\n"
        )
        out = tmp_path / f"out-{donor.name}"
        run_yaml(cfg, out)
        got = read_state(out)
        donor_names = set(read_state(donor))
        assert set(got) == donor_names  # written in the donor's scheme
        for name, v in got.items():
            plain = name if name in a else (other_spellings(name) or [name])[0]
            torch.testing.assert_close(v, (a[plain] + b[plain]) / 2, atol=1e-6, rtol=1e-6, msg=name)
        import transformers

        from mergekitty.tiny_models import model_class

        _, info = model_class(transformers.AutoConfig.from_pretrained(out)).from_pretrained(
            out, dtype=torch.float32, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.isfinite(model_logits(out)).all()
