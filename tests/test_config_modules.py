"""``modules:`` configs: one module is its slices or models, several merge each layer stack of a
vision-language model with its own slices and parameters."""

import json
import textwrap

import pytest
import torch

from helpers import VLM_LAYER_TYPES as LAYER_TYPES
from helpers import VLM_VISION_LAYERS as VISION_LAYERS
from helpers import read_state, write_tiny_vlm
from mergekitty.api import plan_merge, run_merge
from mergekitty.config import load_config
from mergekitty.errors import ConfigError
from mergekitty.params import ParameterResolver


def _merge(text: str, out):
    run_merge(textwrap.dedent(text), out, quiet=True)
    return read_state(out), json.loads((out / "config.json").read_text())


def _same_output(a, b):
    state_a, config_a = a
    state_b, config_b = b
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype
        assert torch.equal(state_a[name], state_b[name]), name
    assert config_a == config_b


# ------------------------------------------------------------------------------ one module


def test_one_module_of_slices_is_its_slices(llama, tmp_path):
    slices = f"""
      - sources: [{{model: {llama["ft1"]}, layer_range: [0, 2]}}, {{model: {llama["ft2"]}, layer_range: [0, 2]}}]
      - sources: [{{model: {llama["ft1"]}, layer_range: [1, 4]}}, {{model: {llama["ft2"]}, layer_range: [1, 4]}}]
        parameters: {{weight: [0.2, 0.8]}}
    """
    plain = _merge(
        f"""
        merge_method: linear
        parameters: {{weight: 0.5}}
        slices:{textwrap.indent(textwrap.dedent(slices), "          ")}
        """,
        tmp_path / "plain",
    )
    moduled = _merge(
        f"""
        merge_method: linear
        parameters: {{weight: 0.5}}
        modules:
          default:
            slices:{textwrap.indent(textwrap.dedent(slices), "              ")}
        """,
        tmp_path / "module",
    )
    _same_output(plain, moduled)
    assert moduled[1]["num_hidden_layers"] == 5


def test_one_module_of_models_is_its_models(llama, tmp_path):
    models = f"""
        - {{model: {llama["ft1"]}, parameters: {{weight: 0.7}}}}
        - {{model: {llama["ft2"]}, parameters: {{weight: 0.3}}}}
    """
    plain = _merge(
        f"""
        merge_method: task_arithmetic
        base_model: {llama["base"]}
        models:{textwrap.indent(textwrap.dedent(models), "          ")}
        """,
        tmp_path / "plain",
    )
    moduled = _merge(
        f"""
        merge_method: task_arithmetic
        base_model: {llama["base"]}
        modules:
          text_decoder:
            models:{textwrap.indent(textwrap.dedent(models), "              ")}
        """,
        tmp_path / "module",
    )
    _same_output(plain, moduled)


def test_written_config_and_to_yaml_keep_the_modules_form(llama, tmp_path):
    text = textwrap.dedent(f"""\
        merge_method: linear
        modules:
          default:
            models:
              - {{model: {llama["ft1"]}}}
              - {{model: {llama["ft2"]}}}
            parameters: {{weight: 0.5}}
        """)
    run_merge(text, tmp_path / "out", quiet=True)
    written = (tmp_path / "out" / "mergekitty_config.yml").read_text()
    config = load_config(text)
    assert load_config(written) == config
    assert load_config(config.to_yaml()) == config
    assert "modules:" in config.to_yaml() and "default:" in config.to_yaml()


# ------------------------------------------------------------------------------ parameter precedence


def test_module_parameters_rank_between_slice_and_top_level():
    config = load_config("""
merge_method: linear
parameters: {weight: 0.1, normalize: false}
modules:
  default:
    parameters: {weight: 0.3, t: [{filter: mlp, value: 0.5}]}
    slices:
      - sources: [{model: a, layer_range: [0, 2], parameters: {weight: 0.9}}, {model: b, layer_range: [0, 2]}]
      - sources: [{model: a, layer_range: [2, 4]}, {model: b, layer_range: [2, 4]}]
        parameters: {weight: 0.6}
""")
    r = ParameterResolver(config)
    assert r.model_value("weight", 0, 0, "x", 0.0) == 0.9  # the source
    assert r.model_value("weight", 0, 1, "x", 0.0) == 0.3  # the module
    assert r.model_value("weight", 1, 1, "x", 0.0) == 0.6  # the slice beats the module
    assert r.global_value("normalize", 0, "x", 0.0) is False  # the top level, which the module does not set
    assert r.global_value("t", 1, "layers.0.mlp.w", 0.0) == 0.5
    assert r.global_value("t", 1, "layers.0.attn.w", 0.0) is None  # the module's filter misses: unset
    assert r.origin("weight", 1, 0, "x", 0.0) == ("modules", "default", "slices", 1, "parameters", "weight")
    assert r.origin("weight", 0, 1, "x", 0.0) == ("modules", "default", "parameters", "weight")
    assert r.origin("normalize", 0, None, "x", 0.0) == ("parameters", "normalize")


def test_module_parameters_in_a_merge(llama, tmp_path):
    a, b = llama["ft1"], llama["ft2"]
    state, _ = _merge(
        f"""
        merge_method: linear
        parameters: {{weight: 0.1, normalize: false}}
        modules:
          default:
            parameters: {{weight: 0.3}}
            slices:
              - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
              - sources: [{{model: {a}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [2, 4]}}]
                parameters: {{weight: 0.6}}
        """,
        tmp_path / "out",
    )
    xa, xb = read_state(a), read_state(b)
    for name, out in state.items():
        # layers 0-1 and the embedding (first slice): the module's 0.3 beats the top level's 0.1;
        # layers 2-3 and the final norm and head (last slice): the slice's 0.6 beats the module's
        first_slice = name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens"))
        w = 0.3 if first_slice else 0.6
        torch.testing.assert_close(out, w * xa[name] + w * xb[name], rtol=1e-6, atol=1e-6)
    assert set(state) == set(xa)


# ------------------------------------------------------------------------------ several modules


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return write_tiny_vlm(root / "a", 1), write_tiny_vlm(root / "b", 2)


@pytest.mark.parametrize(
    "text_name, vision_name",
    [("text_decoder", "vision_tower"), ("language_model", "model.vision_tower.encoder.layers")],
)
def test_two_modules_slice_their_own_stacks(vlm, tmp_path, text_name, vision_name):
    a, b = vlm
    state, config = _merge(
        f"""
        merge_method: linear
        modules:
          {text_name}:
            parameters: {{weight: 0.5}}
            slices:
              - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
              - sources: [{{model: {a}, layer_range: [3, 4]}}, {{model: {b}, layer_range: [3, 4]}}]
          {vision_name}:
            slices:
              - sources:
                  - {{model: {a}, layer_range: [1, 3], parameters: {{weight: 0.8}}}}
                  - {{model: {b}, layer_range: [1, 3], parameters: {{weight: 0.2}}}}
        """,
        tmp_path / "out",
    )
    xa, xb = read_state(a), read_state(b)

    def mixed(name_in, wa):
        return (wa * xa[name_in] + (1 - wa) * xb[name_in]) / 1.0

    expected = {}
    for out, src in enumerate([0, 1, 3]):  # the text module's layers
        for suffix in ("self_attn.q_proj.weight", "input_layernorm.weight"):
            expected[f"model.language_model.layers.{out}.{suffix}"] = mixed(
                f"model.language_model.layers.{src}.{suffix}", 0.5
            )
    for out, src in enumerate([1, 2]):  # the vision module's layers, weighted 0.8 / 0.2
        for suffix in ("mlp.fc1.weight", "layer_norm1.weight"):
            expected[f"model.vision_tower.encoder.layers.{out}.{suffix}"] = mixed(
                f"model.vision_tower.encoder.layers.{src}.{suffix}", 0.8
            )
    # the vision tower's own weights outside its layers follow its module's sources (0.8 / 0.2)
    for name in ("model.vision_tower.embeddings.patch_embedding.weight", "model.vision_tower.post_layernorm.weight"):
        expected[name] = mixed(name, 0.8)
    # the weights under no module's root follow the language model's slices (weight 0.5)
    for name in (
        "model.language_model.embed_tokens.weight",
        "model.language_model.norm.weight",
        "lm_head.weight",
        "model.multi_modal_projector.linear.weight",
    ):
        expected[name] = mixed(name, 0.5)
    assert set(state) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, rtol=1e-6, atol=1e-6)
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["text_config"]["layer_types"] == [LAYER_TYPES[0], LAYER_TYPES[1], LAYER_TYPES[3]]
    assert config["vision_config"]["num_hidden_layers"] == 2


def test_a_module_of_whole_models_keeps_its_stack(vlm):
    a, b = vlm
    plan = plan_merge(f"""
merge_method: linear
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 2]}}]
  vision_tower:
    models: [{{model: {a}}}, {{model: {b}}}]
    parameters: {{weight: 0.5}}
parameters: {{weight: 1.0}}
""")
    jobs = {j.out_name: j for j in plan.jobs}
    vision = [n for n in jobs if n.startswith("model.vision_tower.encoder.layers.")]
    assert len(vision) == 2 * VISION_LAYERS
    assert all(jobs[n].model_params == ({"weight": 0.5}, {"weight": 0.5}) for n in vision)
    assert jobs["model.language_model.layers.1.input_layernorm.weight"].model_params == ({"weight": 1.0},)
    assert plan.out_config["text_config"]["num_hidden_layers"] == 2
    assert plan.out_config["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    # b's tensors outside the vision tower's layers are left out, with the reason
    reasons = {e.reason for e in plan.excluded if plan.models[e.model].path == b}
    assert any(r.startswith("before the layer stack") for r in reasons)
    assert any(r.startswith("a layer of module 'text_decoder'") for r in reasons)


def _layout(text: str, vision: str, extra: tuple[str, ...] = (), vision_key: str = "num_hidden_layers"):
    from mergekitty.architecture import infer_layout

    names = ["embed_tokens.weight"]
    names += [f"{text}.{i}.mlp.weight" for i in range(4)]
    names += [f"{vision}.{i}.fc1.weight" for i in range(3)]
    names += list(extra)
    cfg = {"text_config": {"num_hidden_layers": 4}, "vision_config": {vision_key: 3, "hidden_size": 4}}
    return infer_layout(names, cfg), cfg


GEMMA3 = ("model.language_model.layers", "model.vision_tower.vision_model.encoder.layers")
# Qwen2-VL: the merger's numbered MLP is a stack of its own
QWEN2_VL = ("model.layers", "visual.blocks", ("visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight"), "depth")


@pytest.mark.parametrize(
    "layout, module, selected",
    [
        (GEMMA3, "text_decoder", 0),
        (GEMMA3, "default", 0),
        (GEMMA3, "language_model", 0),
        (GEMMA3, "vision_tower", 1),
        (GEMMA3, "vision_model", 1),
        (GEMMA3, "encoder", 1),
        (GEMMA3, "model.vision_tower.vision_model.encoder.layers", 1),
        (GEMMA3, "vision_tower.vision_model.encoder.layers", 1),  # the other naming scheme
        (GEMMA3, "audio_tower", None),
        (QWEN2_VL, "text_decoder", 0),
        (QWEN2_VL, "vision_tower", 1),
        (QWEN2_VL, "visual", 1),
        (QWEN2_VL, "visual.merger.mlp", "visual.merger.mlp"),
    ],
)
def test_module_names_select_stacks(layout, module, selected):
    from mergekitty.config_modules import stack_of_module

    lay, _ = _layout(*layout)
    expected = layout[selected] if isinstance(selected, int) else selected
    assert stack_of_module(module, lay) == expected


def test_one_module_on_one_stack_is_that_stack_whatever_its_name():
    from mergekitty.architecture import infer_layout
    from mergekitty.config_modules import stack_of_module

    lay = infer_layout([f"model.layers.{i}.w" for i in range(2)], {"num_hidden_layers": 2})
    assert stack_of_module("anything", lay, single=True) == "model.layers"
    assert stack_of_module("vision_tower", lay) is None


@pytest.mark.parametrize(
    "layout, key", [(GEMMA3, "vision_config.num_hidden_layers"), (QWEN2_VL, "vision_config.depth")]
)
def test_a_vision_stacks_layer_count_key(layout, key):
    from mergekitty.architecture.layout import stack_count_key

    lay, cfg = _layout(*layout)
    assert stack_count_key(cfg, layout[1], 3, exclude=lay.count_key) == key


# ------------------------------------------------------------------------------ errors


def _error(text: str, source: str = "cfg.yml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(textwrap.dedent(text), source=source)
    assert "\n" not in str(info.value)
    return info.value


def test_modules_and_slices_together():
    err = _error("""\
        merge_method: linear
        slices:
          - sources: [{model: a, layer_range: [0, 1]}]
        modules:
          default:
            slices:
              - sources: [{model: a, layer_range: [0, 1]}]
        """)
    assert "either 'modules' or 'slices'" in str(err) and err.key == "modules" and err.line == 4
    assert str(err).startswith("cfg.yml:4, key 'modules'")


def test_empty_module_and_empty_modules():
    for body in ("  default: {}", "  default:"):
        err = _error(f"merge_method: linear\nmodules:\n{body}\n")
        assert err.key == "modules.default" and err.line == 3 and "'slices'" in str(err) and "'models'" in str(err)
    err = _error("merge_method: linear\nmodules: {}\n")
    assert err.key == "modules" and err.line == 2 and "empty" in str(err)
    err = _error("merge_method: linear\nmodules:\n  default:\n    slices: []\n")
    assert err.key == "modules.default.slices" and err.line == 4


def test_module_with_slices_and_models():
    err = _error(
        "merge_method: linear\nmodules:\n  default:\n    models: [{model: a}]\n"
        "    slices:\n      - sources: [{model: a, layer_range: [0, 1]}]\n"
    )
    assert err.key == "modules.default.models" and err.line == 4 and "not both" in str(err)


def _plan_error(text: str, tmp_path) -> ConfigError:
    path = tmp_path / "cfg.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        plan_merge(path)
    assert "\n" not in str(info.value)
    return info.value


def test_unknown_module_name_lists_the_modules(vlm, tmp_path):
    a, b = vlm
    err = _plan_error(
        f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {a}}}, {{model: {b}}}]
  audio_tower:
    models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{weight: 0.5}}
""",
        tmp_path,
    )
    assert err.key == "modules.audio_tower" and err.line == 5
    assert "matches no layer stack" in str(err)
    assert "'text_decoder'" in str(err) and "'model.vision_tower.encoder.layers' or 'vision_tower'" in str(err)


def test_module_name_on_a_model_of_one_stack(llama, tmp_path):
    err = _plan_error(
        f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {llama["ft1"]}}}]
  vision_tower:
    models: [{{model: {llama["ft1"]}}}]
parameters: {{weight: 1.0}}
""",
        tmp_path,
    )
    assert err.key == "modules.vision_tower" and err.line == 5 and "'text_decoder' (the language model" in str(err)


def test_language_model_must_have_a_module(vlm, tmp_path):
    a, _ = vlm
    err = _plan_error(
        f"merge_method: linear\nmodules:\n  vision_tower:\n    models: [{{model: {a}}}]\nparameters: {{weight: 1.0}}\n",
        tmp_path,
    )
    assert err.key == "modules" and err.line == 2 and "'model.language_model.layers'" in str(err)


def test_two_modules_for_one_stack(vlm, tmp_path):
    a, _ = vlm
    err = _plan_error(
        f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {a}}}]
  language_model:
    models: [{{model: {a}}}]
parameters: {{weight: 1.0}}
""",
        tmp_path,
    )
    assert err.key == "modules.language_model" and err.line == 5 and "both select" in str(err)


def test_layer_range_beyond_a_modules_stack(vlm, tmp_path):
    a, _ = vlm
    err = _plan_error(
        f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {a}}}]
  vision_tower:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 4]
parameters: {{weight: 1.0}}
""",
        tmp_path,
    )
    assert err.key == "modules.vision_tower.slices[0].sources[0].layer_range" and err.line == 9
    assert "beyond the 3 layers" in str(err) and "model.vision_tower.encoder.layers" in str(err)


def test_two_modules_of_a_transformers_vision_language_model(tmp_path_factory):
    """Gemma 3 (a SigLIP tower and a Gemma 3 language model, as transformers saves them): each
    module sliced, the output loads and runs."""
    from helpers import model_logits
    from mergekitty.tiny_models import make_family

    root = tmp_path_factory.mktemp("gemma3_vl")
    _, a, b = make_family(root, "gemma3_vl", 2)
    out = root / "out"
    state, config = _merge(
        f"""
        merge_method: linear
        modules:
          text_decoder:
            slices:
              - sources: [{{model: {a}, layer_range: [0, 3]}}, {{model: {b}, layer_range: [0, 3]}}]
          vision_tower:
            slices:
              - sources: [{{model: {a}, layer_range: [1, 2]}}, {{model: {b}, layer_range: [1, 2]}}]
        parameters: {{weight: 0.5}}
        """,
        out,
    )
    assert config["text_config"]["num_hidden_layers"] == 3 and config["vision_config"]["num_hidden_layers"] == 1
    vision = {n.split(".layers.")[1].split(".")[0] for n in state if "vision_tower" in n and ".layers." in n}
    assert vision == {"0"}
    xa, xb = read_state(a), read_state(b)
    tower_layer = [n for n in state if "vision_tower" in n and ".layers.0." in n]
    assert tower_layer
    for name in tower_layer:  # output layer 0 of the tower is input layer 1 of each model
        source = name.replace(".layers.0.", ".layers.1.")
        torch.testing.assert_close(state[name], 0.5 * xa[source] + 0.5 * xb[source])
    assert torch.isfinite(model_logits(out)).all()
