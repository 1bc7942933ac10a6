"""``mergekitty fill-missing``: a text-only language model put back into its vision-language model.

The name matching is tested as a pure function on both layouts transformers has used for Llava
(``language_model.model.*`` as ``save_pretrained`` writes it, ``model.language_model.*`` in the
newer one); the command on hand-written checkpoints (fast) and on real tiny Llava models that
transformers loads (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import read_state
from mergekitty.errors import ArchitectureError
from mergekitty.fill_missing import PrefixRule, infer_rules, match_names, parse_prefix

# ------------------------------------------------------------------------------ names (pure)
TEXT_LAYER = ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "input_layernorm.weight"]
VISION_LAYER = ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.fc1.weight", "layer_norm1.weight"]


def _text_names(layers: int = 3) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return names + [f"model.layers.{i}.{p}" for i in range(layers) for p in TEXT_LAYER]


def _vision_names(prefix: str, layers: int = 2) -> list[str]:
    names = [f"{prefix}embeddings.patch_embedding.weight", f"{prefix}post_layernorm.weight"]
    return names + [f"{prefix}encoder.layers.{i}.{p}" for i in range(layers) for p in VISION_LAYER]


def _legacy_vlm(text: list[str]) -> list[str]:
    """Llava as transformers saves it: the causal LM whole under ``language_model.``."""
    return (
        [f"language_model.{n}" for n in text]
        + _vision_names("vision_tower.")
        + ["multi_modal_projector.linear_1.weight"]
    )


def _current_vlm(text: list[str]) -> list[str]:
    """The newer layout: the decoder under ``model.language_model.``, the head at the top."""
    lm = [n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n for n in text]
    return lm + _vision_names("model.vision_tower.") + ["model.multi_modal_projector.linear_1.weight"]


@pytest.mark.parametrize(
    "layout, rules",
    [
        (_legacy_vlm, ["* -> language_model.*"]),
        (_current_vlm, ["model.* -> model.language_model.*", "* -> *"]),
    ],
    ids=["language_model.model", "model.language_model"],
)
def test_every_text_tensor_finds_its_vlm_tensor_in_either_layout(layout, rules):
    text = _text_names()
    vlm = layout(text)
    match = match_names(text, vlm)
    assert [str(r) for r in match.rules] == rules
    expected = {v: t for t, v in zip(text, vlm)}  # layout() lists the text tower first, in text order
    assert match.pairs == expected and match.absent == ()
    # the vision tower's q_proj/o_proj share their last names with the text layers; none is taken
    assert not any("vision" in v for v in match.pairs)


def test_a_vision_tower_under_a_prefix_like_the_text_models_does_not_outvote_it():
    """Paligemma-style names: the vision layers end exactly as the text layers do
    (``...layers.0.self_attn.q_proj.weight``) and are as deep; only the rule that maps the most
    text tensors is taken."""
    text = _text_names(layers=2)
    vlm = _current_vlm(text) + [
        f"vision_tower.vision_model.encoder.layers.{i}.{p}" for i in range(4) for p in TEXT_LAYER
    ]
    assert infer_rules(text, vlm)[0] == PrefixRule(("model",), ("model", "language_model"))
    assert all(v.startswith(("model.language_model.", "lm_head")) for v in match_names(text, vlm).pairs)


def test_a_vision_tensor_of_a_longer_common_suffix_is_not_taken():
    """``model.norm.weight`` ends like ``vision.model.norm.weight`` in three components and like
    ``model.language_model.norm.weight`` in two: the rule every other tensor follows decides."""
    text = _text_names()
    vlm = [*_current_vlm(text), "vision.model.norm.weight"]
    assert match_names(text, vlm).pairs["model.language_model.norm.weight"] == "model.norm.weight"


def test_a_tensor_the_vlm_lacks_is_left_out_and_named():
    text = [*_text_names(), "model.rotary_emb.inv_freq"]
    vlm = _current_vlm(_text_names())
    match = match_names(text, vlm)
    assert match.absent == ("model.rotary_emb.inv_freq",)
    assert len(match.pairs) == len(_text_names())


def test_an_untied_head_the_vlm_ties_is_left_out():
    text = _text_names()
    vlm = [v for v in _legacy_vlm(text) if not v.endswith("lm_head.weight")]
    assert match_names(text, vlm).absent == ("lm_head.weight",)


def test_text_layers_the_vlm_does_not_have_are_an_error_naming_them():
    text = _text_names(layers=5)
    vlm = _legacy_vlm(_text_names(layers=3))
    with pytest.raises(ArchitectureError) as err:
        match_names(text, vlm, text_label="text model T", vlm_label="VLM V")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("8 tensors of text model T have no counterpart in VLM V")
    assert (
        "'model.layers.3.self_attn.q_proj.weight' (as 'language_model.model.layers.3.self_attn.q_proj.weight')"
        in message
    )
    assert "and 4 more" in message


def test_names_with_nothing_in_common_are_one_error():
    with pytest.raises(
        ArchitectureError, match=r"^no tensor of the text model corresponds to a tensor of the VLM"
    ) as err:
        match_names(["transformer.h.0.attn.c_attn.weight"], _legacy_vlm(_text_names()))
    assert "'transformer.h.0.attn.c_attn.weight'" in str(err.value) and "--prefix" in str(err.value)


def test_two_equally_good_mappings_are_an_error():
    text = _text_names(layers=1)
    vlm = [f"{tower}.{n}" for tower in ("left_model", "right_model") for n in text]
    with pytest.raises(ArchitectureError, match="more than one way") as err:
        match_names(text, vlm)
    assert "* -> left_model.*" in str(err.value) and "* -> right_model.*" in str(err.value)
    rule = parse_prefix("right_model.")
    assert set(match_names(text, vlm, [rule]).pairs) == {f"right_model.{n}" for n in text}


def test_stated_prefixes_route_by_the_longest_and_keep_the_rest():
    text = _text_names()
    vlm = _current_vlm(text)
    match = match_names(text, vlm, [parse_prefix("model.=model.language_model.")])
    assert match.pairs["lm_head.weight"] == "lm_head.weight"  # no rule: kept as it is
    assert match.pairs["model.language_model.layers.2.mlp.gate_proj.weight"] == "model.layers.2.mlp.gate_proj.weight"
    with pytest.raises(ArchitectureError, match="check --prefix"):
        match_names(text, vlm, [parse_prefix("language_model.")])


def test_two_text_tensors_onto_one_vlm_tensor_are_an_error():
    text = ["a.x.weight", "b.x.weight"]
    with pytest.raises(ArchitectureError, match="both map onto 'c.x.weight'"):
        match_names(text, ["c.x.weight"], [parse_prefix("a=c"), parse_prefix("b=c")])


@pytest.mark.parametrize(
    "value, rule",
    [
        ("language_model.", ((), ("language_model",))),
        ("language_model", ((), ("language_model",))),
        ("model.=model.language_model.", (("model",), ("model", "language_model"))),
        ("=x", ((), ("x",))),
        ("model.=", (("model",), ())),
    ],
)
def test_prefix_values(value, rule):
    assert parse_prefix(value) == PrefixRule(*rule)


@pytest.mark.parametrize("value", ["a..b=c", "a=b..c", "a b.=c", "a=b=c"])
def test_malformed_prefix_values_are_one_error(value):
    with pytest.raises(ArchitectureError, match=r"^--prefix '.*': expected TEXT_PREFIX=VLM_PREFIX"):
        parse_prefix(value)


# ------------------------------------------------------------------ the command, fast checkpoints
HIDDEN, VOCAB, LAYERS = 8, 16, 2


def _text_state(seed: int, dtype=torch.float32, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": [vocab, HIDDEN],
        "model.norm.weight": [HIDDEN],
        "lm_head.weight": [vocab, HIDDEN],
    }
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = [HIDDEN, HIDDEN]
        shapes[f"model.layers.{i}.input_layernorm.weight"] = [HIDDEN]
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _write(path: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


VLM_CONFIG = {"architectures": ["TinyVisionForConditionalGeneration"], "model_type": "tiny_vision"}
SIDE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 64}',
    "preprocessor_config.json": '{"image_size": 8}',
    "chat_template.json": '{"chat_template": "{{ messages }}"}',
    "README.md": "# the VLM's own card\n",
}


@pytest.fixture
def tiny(tmp_path):
    """A VLM in the newer layout (bf16 and an int64 buffer among its tensors), its side files, and
    a text model of other weights (float32): the VLM's language tower renamed and redrawn."""
    vlm = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
           for k, v in _text_state(1).items()}  # fmt: skip
    vlm |= {
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN).bfloat16(),
        "model.vision_tower.post_layernorm.weight": torch.randn(HIDDEN),
        "model.multi_modal_projector.linear_1.weight": torch.randn(HIDDEN, HIDDEN),
        "model.vision_tower.position_ids": torch.arange(4, dtype=torch.int64),
    }
    vlm["model.language_model.norm.weight"] = vlm["model.language_model.norm.weight"].bfloat16()
    base = _write(tmp_path / "vlm", vlm, VLM_CONFIG)
    for name, text in SIDE_FILES.items():
        (base / name).write_text(text)
    text = _write(tmp_path / "text", _text_state(2), {"model_type": "llama"})
    return base, text, vlm


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``mergekitty fill-missing ARGS`` in this process: (exit code, stdout, stderr joined in one line)."""
    from mergekitty.cli.main import group

    code = 0
    try:
        group(["fill-missing", *map(str, args)], standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_output_is_the_vlm_with_the_text_models_tensors(tiny, tmp_path, capsys):
    base, text, vlm = tiny
    out = tmp_path / "out"
    code, _, err = _cli(capsys, base, text, out)
    assert code == 0, err
    assert " ".join(err.split()) == f"done: 7 tensors from {text}, 4 from {base}; written to {out}"
    got, merged = read_state(out), _text_state(2)
    assert set(got) == set(vlm)
    for name, tensor in vlm.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
    for name, tensor in merged.items():
        vlm_name = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        # a float32 text tensor in a bf16 place: rounded as torch rounds
        assert torch.equal(got[vlm_name], tensor.to(vlm[vlm_name].dtype)), name
    for name in ("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", "model.vision_tower.position_ids",
                 "model.vision_tower.post_layernorm.weight", "model.multi_modal_projector.linear_1.weight"):  # fmt: skip
        assert torch.equal(got[name], vlm[name]), name
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    for name, content in SIDE_FILES.items():
        if name != "README.md":
            assert (out / name).read_text() == content, name
    card = (out / "README.md").read_text()
    assert f"From {text}: 7 tensors (name mapping: `model.* -> model.language_model.*, * -> *`)" in card
    assert f"From {base}: 4 tensors: `model.multi_modal_projector` (1), `model.vision_tower` (3)" in card


def test_without_a_card_the_vlms_own_readme_is_kept(tiny, tmp_path, capsys):
    base, text, _ = tiny
    assert _cli(capsys, base, text, tmp_path / "out", "--no-write-model-card", "-q")[0] == 0
    assert (tmp_path / "out" / "README.md").read_text() == SIDE_FILES["README.md"]


def test_a_stated_prefix_gives_the_same_output(tiny, tmp_path, capsys):
    base, text, _ = tiny
    assert _cli(capsys, base, text, tmp_path / "a", "-q")[0] == 0
    assert _cli(capsys, base, text, tmp_path / "b", "-q", "--prefix", "model.=model.language_model.")[0] == 0
    a, b = read_state(tmp_path / "a"), read_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_prints_the_mapping_and_counts_and_writes_nothing(tiny, tmp_path, capsys):
    base, text, _ = tiny
    code, out, err = _cli(capsys, base, text, tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert out.splitlines() == [
        "name mapping: model.* -> model.language_model.*, * -> *",
        f"tensors from {text}: 7",
        f"tensors from {base}: 4",
    ]
    assert not (tmp_path / "out").exists()


def test_text_tensors_the_vlm_lacks_are_a_warning(tiny, tmp_path, capsys):
    base, _, _ = tiny
    state = _text_state(2) | {"model.rotary_emb.inv_freq": torch.ones(4)}
    text = _write(tmp_path / "text-extra", state)
    code, _, err = _cli(capsys, base, text, tmp_path / "out")
    assert code == 0, err
    err = " ".join(err.split())
    assert f"text model {text} has tensor 'model.rotary_emb.inv_freq', which VLM {base} lacks: left out" in err
    assert "model.rotary_emb.inv_freq" not in read_state(tmp_path / "out")


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_shape_mismatch_is_one_line_naming_the_tensor(tiny, tmp_path, capsys):
    base, _, _ = tiny
    state = _text_state(2)
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    text = _write(tmp_path / "text-wide", state)
    code, _, err = _cli(capsys, base, text, tmp_path / "out")
    assert code == 1
    assert _one_error_line(err) == (
        f"error: tensor 'model.layers.1.self_attn.q_proj.weight' of text model {text} has shape [8, 9], "
        f"but 'model.language_model.layers.1.self_attn.q_proj.weight' of VLM {base} has shape [8, 8]"
    )
    assert not (tmp_path / "out").exists()


def test_another_vocabulary_is_one_line_naming_the_tensor_and_both_shapes(tiny, tmp_path, capsys):
    base, _, _ = tiny
    text = _write(tmp_path / "text-vocab", _text_state(2, vocab=VOCAB + 4))
    code, _, err = _cli(capsys, base, text, tmp_path / "out")
    line = _one_error_line(err)
    assert code == 1
    assert "tensor 'lm_head.weight'" in line and "[20, 8]" in line and "[16, 8]" in line
    assert "vocabularies differ" in line


@pytest.mark.parametrize("which", ["base", "text"])
def test_a_missing_directory_is_one_line(tiny, tmp_path, capsys, which):
    base, text, _ = tiny
    args = [tmp_path / "nope", text] if which == "base" else [base, tmp_path / "nope"]
    code, _, err = _cli(capsys, *args, tmp_path / "out")
    assert code == 1
    assert f"not found: {tmp_path / 'nope'}" in _one_error_line(err)


def test_a_text_model_of_other_names_is_one_line(tiny, tmp_path, capsys):
    base, _, _ = tiny
    text = _write(tmp_path / "gpt2", {"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)})
    code, _, err = _cli(capsys, base, text, tmp_path / "out")
    assert code == 1
    assert "no tensor of text model" in _one_error_line(err)


def test_a_vlm_without_config_is_one_line(tiny, tmp_path, capsys):
    base, text, _ = tiny
    (base / "config.json").unlink()
    code, _, err = _cli(capsys, base, text, tmp_path / "out")
    assert code == 1 and "no config.json" in _one_error_line(err)


def test_a_failure_while_writing_leaves_the_previous_output_as_it_was(tiny, tmp_path, capsys, monkeypatch):
    base, text, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import mergekitty.io.tensor_stream as writer

    real = writer.write_all

    def failing(tensors, shard_writer, seed, on_tensor=None):
        real(tensors[:3], shard_writer, seed, on_tensor)
        raise OSError(28, "No space left on device", str(out / "x"))

    monkeypatch.setattr(writer, "write_all", failing)
    code, _, err = _cli(capsys, base, text, out)
    assert code == 1 and "No space left on device" in _one_error_line(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# ------------------------------------------------------------------- the command, real Llava models
def _llava_config():
    import transformers as T

    vision = T.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = T.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny Llava as ``save_pretrained`` writes it, the same in the newer tensor layout, and a
    Llama of the same text config with other random weights (the "merged" language model)."""
    import transformers as T

    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    config = _llava_config()
    vlm = T.LlavaForConditionalGeneration(config).eval()
    vlm.save_pretrained(root / "legacy")
    (root / "legacy" / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor"}')
    torch.manual_seed(1)
    text = T.LlamaForCausalLM(config.text_config).eval()
    text.save_pretrained(root / "text")

    current = root / "current"
    current.mkdir()
    for f in ("config.json", "generation_config.json", "preprocessor_config.json"):
        (current / f).write_bytes((root / "legacy" / f).read_bytes())
    save_file({_current_name(k): v.contiguous() for k, v in read_state(root / "legacy").items()},
              str(current / "model.safetensors"))  # fmt: skip
    return {"legacy": root / "legacy", "current": current, "text": root / "text", "vlm": vlm, "lm": text}


def _current_name(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model."):
        return name.removeprefix("language_model.")
    return "model." + name


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_the_output_loads_as_llava_with_the_merged_language_model(llava, tmp_path, capsys, layout):
    import transformers as T

    base = llava[layout]
    assert ("language_model.model.norm.weight" in read_state(base)) == (layout == "legacy")
    out = tmp_path / "out"
    code, _, err = _cli(capsys, base, llava["text"], out, "-q")
    assert code == 0, err
    model, info = T.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got = model.state_dict()
    lm, vlm = llava["lm"].state_dict(), llava["vlm"].state_dict()
    language = {k for k in got if k.startswith("model.language_model.") or k == "lm_head.weight"}
    assert len(language) == len(lm)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(vlm[q], lm["model.layers.0.self_attn.q_proj.weight"])  # the two towers differ
    for name in language:
        text_name = (
            "lm_head.weight" if name == "lm_head.weight" else "model." + name.removeprefix("model.language_model.")
        )
        assert torch.equal(got[name], lm[text_name]), name
    others = set(got) - language
    assert any(k.startswith("model.vision_tower.") for k in others)
    assert any(k.startswith("model.multi_modal_projector.") for k in others)
    for name in others:
        assert torch.equal(got[name], vlm[name]), name
    assert (out / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    assert (out / "generation_config.json").is_file()


def test_language_tensors_the_text_model_lacks_are_an_error_unless_partial(tiny, tmp_path, capsys):
    """A text model without the final norm would leave the VLM's own norm beside merged layers."""
    base, _, _ = tiny
    state = {k: v for k, v in _text_state(2).items() if k != "model.norm.weight"}
    text = _write(tmp_path / "text-short", state)
    code, _, err = _cli(capsys, base, text, tmp_path / "out")
    assert code != 0 and "'model.language_model.norm.weight'" in err and "--partial" in err
    assert not (tmp_path / "out").exists()
    code, _, err = _cli(capsys, base, text, tmp_path / "out", "--partial")
    assert code == 0, err
    assert torch.equal(
        read_state(tmp_path / "out")["model.language_model.norm.weight"],
        read_state(base)["model.language_model.norm.weight"],
    )
