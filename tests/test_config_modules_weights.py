"""``modules:`` configs: each module merges its own weights outside the layers (a vision tower's
patch embedding and final norm) with its own sources and parameters, and a module without layers
(mergekit's ``multi_modal_projector``) merges the weights its name names."""

import json
import textwrap

import pytest
import torch

from helpers import VLM_VISION_LAYERS, read_state, write_tiny_vlm
from mergekitty.api import plan_merge, run_merge
from mergekitty.config import load_config
from mergekitty.errors import ConfigError

TEXT = "model.language_model"
VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector.linear.weight"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_weights")
    return tuple(write_tiny_vlm(root / name, seed) for name, seed in (("a", 11), ("b", 12), ("c", 13)))


def _merge(text: str, out):
    run_merge(textwrap.dedent(text), out, quiet=True)
    return read_state(out), json.loads((out / "config.json").read_text())


def _plan_error(text: str, tmp_path) -> ConfigError:
    path = tmp_path / "cfg.yml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        plan_merge(path)
    assert "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------------------------ each module's own weights


def test_each_module_merges_its_own_weights(vlm, tmp_path):
    """Text from a and b, the vision tower from b and c, the projector from c and a; each with
    its own gradient, so that the position (t) of every weight shows in its value."""
    a, b, c = vlm
    state, config = _merge(
        f"""
        merge_method: linear
        parameters: {{normalize: false, weight: 9.0}}
        modules:
          text_decoder:
            parameters: {{weight: [0.2, 0.6]}}
            slices:
              - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
              - sources: [{{model: {a}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [2, 4]}}]
          vision_tower:
            parameters: {{weight: [0.1, 0.9]}}
            slices:
              - sources:
                  - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}
                  - {{model: {c}, layer_range: [0, 2]}}
              - sources:
                  - {{model: {b}, layer_range: [2, 3], parameters: {{weight: 0.7}}}}
                  - {{model: {c}, layer_range: [2, 3]}}
                parameters: {{weight: 0.4}}
          multi_modal_projector:
            parameters: {{weight: [0.5, 1.0]}}
            models:
              - {{model: {c}, parameters: {{weight: 0.25}}}}
              - {{model: {a}}}
        """,
        tmp_path / "out",
    )
    xa, xb, xc = read_state(a), read_state(b), read_state(c)
    expected = {}
    for out in range(4):  # two slices of two layers: t = 0, 1 in each
        w = [0.2, 0.6][out % 2]
        for suffix in ("self_attn.q_proj.weight", "input_layernorm.weight"):
            name = f"{TEXT}.layers.{out}.{suffix}"
            expected[name] = w * xa[name] + w * xb[name]
    for i, wc in enumerate([0.1, 0.9, 0.4]):  # the module's gradient at t = 0, 1; the last slice's 0.4
        for suffix in ("mlp.fc1.weight", "layer_norm1.weight"):
            name = f"{VISION}.encoder.layers.{i}.{suffix}"
            expected[name] = 0.7 * xb[name] + wc * xc[name]
    # the text module: its embedding before its stack (t=0), its norm and head after it (t=1)
    name = f"{TEXT}.embed_tokens.weight"
    expected[name] = 0.2 * xa[name] + 0.2 * xb[name]
    for name in (f"{TEXT}.norm.weight", "lm_head.weight"):
        expected[name] = 0.6 * xa[name] + 0.6 * xb[name]
    # the vision module: its patch embedding from its first slice (t=0), its final norm from its
    # last slice, whose own weight beats the module's
    name = f"{VISION}.embeddings.patch_embedding.weight"
    expected[name] = 0.7 * xb[name] + 0.1 * xc[name]
    name = f"{VISION}.post_layernorm.weight"
    expected[name] = 0.7 * xb[name] + 0.4 * xc[name]
    # the projector: no layers, its weights at t=0
    expected[PROJECTOR] = 0.25 * xc[PROJECTOR] + 0.5 * xa[PROJECTOR]
    assert set(state) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["vision_config"]["num_hidden_layers"] == VLM_VISION_LAYERS


def _other_scheme(src, dst):
    """``src`` with every tensor under the other naming scheme of vision-language checkpoints."""
    import shutil

    from safetensors.torch import save_file

    from mergekitty.architecture.layout import other_spellings

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {(other_spellings(n) or [n])[0]: t for n, t in read_state(src).items()}
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("donor_first", [True, False])
def test_modules_of_models_in_both_naming_schemes(vlm, tmp_path, donor_first):
    from mergekitty.architecture.layout import other_spellings

    a, b, _ = vlm
    b_other = _other_scheme(b, tmp_path / "b-other")
    first, second = (a, b_other) if donor_first else (b_other, a)
    state, _ = _merge(
        f"""
        merge_method: linear
        parameters: {{normalize: false}}
        modules:
          text_decoder:
            models: [{{model: {first}, parameters: {{weight: 0.5}}}}, {{model: {second}, parameters: {{weight: 0.5}}}}]
          vision_tower:
            models: [{{model: {first}, parameters: {{weight: 0.9}}}}, {{model: {second}, parameters: {{weight: 0.1}}}}]
          multi_modal_projector:
            models: [{{model: {first}, parameters: {{weight: 0.2}}}}, {{model: {second}, parameters: {{weight: 0.8}}}}]
        """,
        tmp_path / "out",
    )
    x_first, x_second = read_state(a if donor_first else b), read_state(b if donor_first else a)
    assert set(state) == set(read_state(first))  # written in the donor's scheme
    for name, tensor in state.items():
        plain = name if name in x_first else other_spellings(name)[0]
        w = 0.9 if plain.startswith(VISION) else 0.2 if plain == PROJECTOR else 0.5
        torch.testing.assert_close(tensor, w * x_first[plain] + (1 - w) * x_second[plain], msg=name)


def test_what_each_module_leaves_out_is_said(vlm):
    a, b, c = vlm
    plan = plan_merge(f"""
merge_method: linear
parameters: {{weight: 0.5}}
modules:
  text_decoder:
    models: [{{model: {a}}}, {{model: {b}}}]
  vision_tower:
    models: [{{model: {b}}}, {{model: {c}}}]
  multi_modal_projector:
    models: [{{model: {c}}}]
""")
    reasons = {}
    for e in plan.excluded:
        for name in e.tensors:
            reasons[(plan.models[e.model].path, name)] = e.reason
    vision_reason = "before the layer stack of module 'vision_tower', which its first slice takes from"
    assert reasons[(a, f"{VISION}.embeddings.patch_embedding.weight")].startswith(vision_reason)
    assert reasons[(a, f"{VISION}.post_layernorm.weight")].startswith("after the layer stack of module 'vision_tower'")
    assert reasons[(a, f"{VISION}.encoder.layers.0.mlp.fc1.weight")].startswith("a layer of module 'vision_tower'")
    for model in (a, b):
        assert (
            reasons[(model, PROJECTOR)] == "a weight of module 'multi_modal_projector', which does not read this model"
        )
    assert reasons[(c, f"{TEXT}.embed_tokens.weight")].startswith("before the layer stack, which the first slice")
    assert reasons[(c, "lm_head.weight")].startswith("after the layer stack, which the last slice")
    jobs = {j.out_name: j for j in plan.jobs}
    assert [plan.models[s.model].path for s in jobs[PROJECTOR].sources] == [c]
    assert [plan.models[s.model].path for s in jobs[f"{VISION}.post_layernorm.weight"].sources] == [b, c]
    assert [plan.models[s.model].path for s in jobs[f"{TEXT}.norm.weight"].sources] == [a, b]


def test_a_projector_module_of_slices_is_its_models(vlm, tmp_path):
    a, b, _ = vlm
    head = f"""
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}, {{model: {b}}}]
    """
    by_models = _merge(
        head
        + f"""
          multi_modal_projector:
            models: [{{model: {a}, parameters: {{weight: 0.9}}}}, {{model: {b}, parameters: {{weight: 0.1}}}}]
        """,
        tmp_path / "models",
    )
    by_slices = _merge(
        head
        + f"""
          model.multi_modal_projector:
            slices:
              - sources:
                  - {{model: {a}, layer_range: [0, 0], parameters: {{weight: 0.9}}}}
                  - {{model: {b}, layer_range: [0, 0], parameters: {{weight: 0.1}}}}
        """,
        tmp_path / "slices",
    )
    xa, xb = read_state(a), read_state(b)
    for state, config in (by_models, by_slices):
        torch.testing.assert_close(state[PROJECTOR], (0.9 * xa[PROJECTOR] + 0.1 * xb[PROJECTOR]) / 1.0)
        assert config["text_config"]["num_hidden_layers"] == 4
    assert list(by_models[0]) == list(by_slices[0])


def test_one_module_per_stack_is_the_plain_merge_outside_the_tower(vlm, tmp_path):
    """A text module alone keeps every weight outside its stack (the tower's too) with it, as
    without modules; a single-stack merge is unchanged (tests/test_config_modules.py)."""
    a, b, _ = vlm
    plain, _ = _merge(
        f"""
        merge_method: linear
        parameters: {{weight: 0.5}}
        models: [{{model: {a}}}, {{model: {b}}}]
        """,
        tmp_path / "plain",
    )
    moduled, _ = _merge(
        f"""
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}, {{model: {b}}}]
        """,
        tmp_path / "module",
    )
    assert list(plain) == list(moduled)
    for name in plain:
        assert torch.equal(plain[name], moduled[name]), name


# ------------------------------------------------------------------------------ roots and positions


def _layout(names, cfg):
    from mergekitty.architecture import infer_layout

    return infer_layout(names, cfg)


QWEN2_VL = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.mlp.weight" for i in range(4)),
    "model.norm.weight",
    "visual.patch_embed.proj.weight",
    *(f"visual.blocks.{i}.fc1.weight" for i in range(3)),
    "visual.merger.ln_q.weight",
    "visual.merger.mlp.0.weight",
    "visual.merger.mlp.2.weight",
]
QWEN2_VL_CFG = {"num_hidden_layers": 4, "vision_config": {"depth": 3}}


def test_a_towers_root_holds_a_smaller_stack_whose_root_is_longer():
    from mergekitty.config_modules import stack_roots

    lay = _layout(QWEN2_VL, QWEN2_VL_CFG)
    stacks = {0: "model.layers", 1: "visual.blocks", 2: "visual.merger.mlp"}
    assert stack_roots(stacks, 0, lay) == {0: "model.", 1: "visual.", 2: "visual.merger."}
    assert stack_roots({0: "model.layers", 1: "visual.blocks"}, 0, lay) == {0: "model.", 1: "visual."}


def test_roots_of_a_gemma3_layout():
    from mergekitty.config_modules import stack_roots

    names = [f"model.language_model.layers.{i}.w" for i in range(4)]
    names += [f"model.vision_tower.vision_model.encoder.layers.{i}.w" for i in range(3)]
    names += ["model.vision_tower.vision_model.post_layernorm.weight", "model.language_model.norm.weight"]
    lay = _layout(names, {"text_config": {"num_hidden_layers": 4}, "vision_config": {"num_hidden_layers": 3}})
    stacks = {0: "model.language_model.layers", 1: "model.vision_tower.vision_model.encoder.layers"}
    assert stack_roots(stacks, 0, lay) == {0: "model.language_model.", 1: "model.vision_tower."}


@pytest.mark.parametrize(
    "name, root",
    [
        ("multi_modal_projector", "model.multi_modal_projector."),
        ("model.multi_modal_projector", "model.multi_modal_projector."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("audio_projector", None),
        ("weight", None),  # the last part of a name is no module
    ],
)
def test_layerless_root(name, root):
    from mergekitty.config_modules import layerless_root

    names = ["model.embed_tokens.weight", "model.layers.0.w", "model.multi_modal_projector.linear.weight"]
    assert layerless_root(name, _layout(names, {"num_hidden_layers": 1})) == root


def test_layerless_root_in_the_other_naming_scheme_and_ambiguous():
    from mergekitty.config_modules import AmbiguousModule, layerless_root

    lay = _layout(["multi_modal_projector.w", "language_model.model.layers.0.w"], {"num_hidden_layers": 1})
    assert layerless_root("model.multi_modal_projector", lay) == "multi_modal_projector."
    lay = _layout(["a.proj.w", "b.proj.w", "model.layers.0.w"], {"num_hidden_layers": 1})
    with pytest.raises(AmbiguousModule, match="'a.proj.', 'b.proj.'"):
        layerless_root("proj", lay)


@pytest.mark.parametrize(
    "name, before",
    [
        ("embeddings.patch_embedding.weight", True),  # SigLIP
        ("embeddings.position_embedding.weight", True),
        ("post_layernorm.weight", False),
        ("head.probe", False),
        ("patch_embed.proj.weight", True),  # Qwen2-VL
        ("merger.mlp.0.weight", False),
        ("ln_pre.weight", True),  # Pixtral
        ("patch_conv.weight", True),
        ("class_embedding", True),  # Llama 4
        ("positional_embedding_vlm", True),
        ("layernorm_pre.weight", True),
        ("layernorm_post.weight", False),
        ("vision_adapter.mlp.fc1.weight", False),
        ("conv1.weight", True),  # Whisper's encoder
        ("embed_positions.weight", True),
        ("layer_norm.weight", False),
        ("final_layer_norm.weight", False),  # T5
        ("embed_tokens.weight", True),
    ],
)
def test_before_or_after_a_modules_stack(name, before):
    from mergekitty.architecture.layout import before_stack

    assert before_stack(name) is before


# ------------------------------------------------------------------------------ errors


def test_a_projector_slice_with_layers(vlm, tmp_path):
    a, b, _ = vlm
    err = _plan_error(
        f"""\
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}]
          multi_modal_projector:
            slices:
              - sources:
                  - model: {a}
                    layer_range: [0, 1]
        """,
        tmp_path,
    )
    assert err.key == "modules.multi_modal_projector.slices[0].sources[0].layer_range" and err.line == 10
    assert "no layers" in str(err) and "[0, 0]" in str(err) and "'model.multi_modal_projector.'" in str(err)


def test_an_empty_range_of_a_module_with_layers(vlm, tmp_path):
    a, _, _ = vlm
    err = _plan_error(
        f"""\
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}]
          vision_tower:
            slices:
              - sources: [{{model: {a}, layer_range: [0, 0]}}]
        """,
        tmp_path,
    )
    assert err.key == "modules.vision_tower.slices[0].sources[0].layer_range" and err.line == 8
    assert "selects no layers" in str(err)


def test_an_empty_range_of_top_level_slices():
    with pytest.raises(ConfigError) as info:
        load_config("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 0]}\n")
    assert info.value.key == "slices[0].sources[0].layer_range" and info.value.line == 4
    assert "0 <= start < stop" in str(info.value)


def test_a_projector_module_reading_a_model_without_one(vlm, tmp_path, llama):
    a, _, _ = vlm
    err = _plan_error(
        f"""\
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}]
          multi_modal_projector:
            models:
              - model: {a}
              - model: {llama["ft1"]}
        """,
        tmp_path,
    )
    assert err.key == "modules.multi_modal_projector.models[1].model" and err.line == 9
    assert "has no weights for module 'multi_modal_projector'" in str(err)


def test_two_modules_for_one_projector(vlm, tmp_path):
    a, _, _ = vlm
    err = _plan_error(
        f"""\
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}]
          multi_modal_projector:
            models: [{{model: {a}}}]
          model.multi_modal_projector:
            models: [{{model: {a}}}]
        """,
        tmp_path,
    )
    assert err.key == "modules.model.multi_modal_projector" and err.line == 8
    assert "both select the weights under 'model.multi_modal_projector.'" in str(err)


def test_unknown_module_lists_the_modules_without_layers(vlm, tmp_path):
    a, _, _ = vlm
    err = _plan_error(
        f"""\
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          text_decoder:
            models: [{{model: {a}}}]
          audio_projector:
            models: [{{model: {a}}}]
        """,
        tmp_path,
    )
    assert err.key == "modules.audio_projector" and err.line == 6
    assert "'multi_modal_projector' (no layers)" in str(err)


# ------------------------------------------------------------------------------ a transformers model


def test_three_modules_of_a_transformers_vision_language_model(tmp_path_factory):
    """Gemma 3 (a SigLIP tower, a projector and a Gemma 3 language model, as transformers saves
    them): each module with its own models and weights; the output loads and runs."""
    from helpers import model_logits
    from mergekitty.tiny_models import make_family

    root = tmp_path_factory.mktemp("gemma3_vl_modules")
    _, a, b = make_family(root, "gemma3_vl", 2)
    out = root / "out"
    state, config = _merge(
        f"""
        merge_method: linear
        parameters: {{normalize: false}}
        modules:
          text_decoder:
            slices:
              - sources: [{{model: {a}, layer_range: [0, 3]}}, {{model: {b}, layer_range: [0, 3]}}]
            parameters: {{weight: 0.5}}
          vision_tower:
            models: [{{model: {a}, parameters: {{weight: 0.8}}}}, {{model: {b}, parameters: {{weight: 0.2}}}}]
          multi_modal_projector:
            models: [{{model: {a}, parameters: {{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.7}}}}]
        """,
        out,
    )
    assert config["text_config"]["num_hidden_layers"] == 3
    xa, xb = read_state(a), read_state(b)
    weights = {"vision_tower.": 0.8, "multi_modal_projector.": 0.3, "language_model.": 0.5}
    checked = set()
    for name, tensor in state.items():
        wa = next(w for prefix, w in weights.items() if name.startswith(prefix))
        wb = 0.5 if wa == 0.5 else 1 - wa
        torch.testing.assert_close(tensor, wa * xa[name] + wb * xb[name], msg=name)
        checked.add(next(p for p in weights if name.startswith(p)))
    assert checked == set(weights)
    assert "vision_tower.post_layernorm.weight" in state and "multi_modal_projector.mm_soft_emb_norm.weight" in state
    assert torch.isfinite(model_logits(out)).all()
