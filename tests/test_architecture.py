import pytest

from mergekitty.architecture.layout import infer_layout
from mergekitty.errors import ArchitectureError


def _llama_names(prefix="model", layers=3):
    names = [f"{prefix}.embed_tokens.weight", f"{prefix}.norm.weight", "lm_head.weight"]
    for i in range(layers):
        for s in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            names.append(f"{prefix}.layers.{i}.{s}")
    return names


def test_plain_decoder():
    lay = infer_layout(_llama_names(), {"num_hidden_layers": 3})
    assert lay.num_layers == 3 and lay.prefix == "model.layers" and lay.count_key == "num_hidden_layers"
    assert lay.pre == ("model.embed_tokens.weight",)
    assert set(lay.post) == {"model.norm.weight", "lm_head.weight"}
    assert set(lay.layer_tensors[1]) == {"self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"}


def test_prefixed_language_model_with_vision_tower():
    names = _llama_names("model.language_model", 2)
    names += [f"model.vision_tower.encoder.layers.{i}.attn.weight" for i in range(5)]
    names += ["model.multi_modal_projector.linear.weight"]
    cfg = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 5}}
    lay = infer_layout(names, cfg)
    assert lay.prefix == "model.language_model.layers" and lay.num_layers == 2
    assert lay.count_key == "text_config.num_hidden_layers"
    assert "model.vision_tower.encoder.layers.3.attn.weight" in lay.pre
    assert "model.multi_modal_projector.linear.weight" in lay.pre
    assert "model.language_model.norm.weight" in lay.post


def test_gpt2_style_names():
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]
    names += [f"transformer.h.{i}.attn.c_attn.weight" for i in range(4)]
    lay = infer_layout(names, {"n_layer": 4})
    assert lay.prefix == "transformer.h" and lay.count_key == "n_layer"
    assert set(lay.pre) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert lay.post == ("transformer.ln_f.weight",)


def test_layer_count_mismatch_names_the_groups():
    with pytest.raises(ArchitectureError, match="says 5 layers.*model.layers"):
        infer_layout(_llama_names(layers=3), {"num_hidden_layers": 5}, where="m")


def test_no_numbered_tensors_is_an_error_naming_tensors():
    with pytest.raises(ArchitectureError, match="weird.a"):
        infer_layout(["weird.a", "weird.b"], {"num_hidden_layers": 2})


def test_missing_layer_is_an_error():
    names = [n for n in _llama_names(layers=3) if ".layers.1." not in n]
    with pytest.raises(ArchitectureError, match=r"layers 1\b"):
        infer_layout(names, {"num_hidden_layers": 3})
