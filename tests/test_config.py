"""Config loading: the schema, normalization, and errors that name the key and the line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mergekitty.config import (
    ConditionalParameter,
    MergeConfiguration,
    ModelTokenEmbedding,
    ZeroEmbedding,
    check_method,
    effective_tokenizer_source,
    load_config,
    load_config_file,
    normalize_dtype,
)
from mergekitty.errors import ConfigError
from mergekitty.refs import ModelReference

FIX = "/tmp/mergekitty-fixtures"

# Representative conformance cases (copied; shared/ is not part of the repository).
CASES = {
    "passthrough_frankenmerge": """
#| description: Frankenmerge - layers 0-2 of ft1 followed by layers 1-3 of ft2 (6 layers out)
slices:
  - sources:
      - model: ${FIX}/llama/ft1
        layer_range: [0, 3]
  - sources:
      - model: ${FIX}/llama/ft2
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
    "ties_per_model": """
#| description: TIES with per-model densities, normalize false, int8_mask true, rescale true
models:
  - model: ${FIX}/llama/ft1
    parameters: {weight: 1.0, density: 0.3}
  - model: ${FIX}/llama/ft2
    parameters: {weight: 1.0, density: 0.6}
  - model: ${FIX}/llama/ft3
    parameters: {weight: 0.5, density: 0.9}
base_model: ${FIX}/llama/base
merge_method: ties
parameters:
  normalize: false
  int8_mask: true
  rescale: true
dtype: float32
""",
    "tok_pad": """
#| dialects:
#|   mergekitty: {tokenizer_source: null}
models:
  - model: ${FIX}/llama/ft1
    parameters: {weight: 1.0}
  - model: ${FIX}/llama/ft_tok
    parameters: {weight: 1.0}
base_model: ${FIX}/llama/base
merge_method: task_arithmetic
tokenizer:
  source: union
  pad_to_multiple_of: 64
dtype: float32
""",
    "tok_base": """
models:
  - model: ${FIX}/llama/ft1
    parameters: {weight: 1.0}
  - model: ${FIX}/llama/ft_tok
    parameters: {weight: 1.0}
base_model: ${FIX}/llama/base
merge_method: task_arithmetic
tokenizer_source: base
dtype: float32
""",
    "chat_template_chatml": """
models:
  - model: ${FIX}/llama/base
    parameters: {weight: 0.5}
  - model: ${FIX}/llama/ft3
    parameters: {weight: 0.5}
merge_method: linear
chat_template: chatml
dtype: float32
""",
    "slices_linear": """
slices:
  - sources:
      - model: ${FIX}/llama/ft1
        layer_range: [0, 2]
        parameters: {weight: 0.8}
      - model: ${FIX}/llama/ft2
        layer_range: [0, 2]
        parameters: {weight: 0.2}
  - sources:
      - model: ${FIX}/llama/ft1
        layer_range: [2, 4]
        parameters: {weight: 0.1}
      - model: ${FIX}/llama/ft2
        layer_range: [2, 4]
        parameters: {weight: 0.9}
merge_method: linear
dtype: float32
""",
    "err_unknown_method": """
models:
  - model: ${FIX}/llama/ft1
  - model: ${FIX}/llama/ft2
merge_method: definitely_not_a_method
dtype: float32
""",
}


def case(name: str) -> str:
    return CASES[name].replace("${FIX}", FIX)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(textwrap.dedent(text), source="cfg.yml")
    return info.value


@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance_cases_parse(name):
    cfg = load_config(case(name), source=f"{name}.yml")
    assert cfg.source_text == case(name)
    assert cfg.referenced_models()
    # round trip through to_yaml
    again = load_config(cfg.to_yaml())
    assert again == cfg


def test_frankenmerge_shape():
    cfg = load_config(case("passthrough_frankenmerge"))
    assert cfg.models is None and len(cfg.slices) == 2
    assert cfg.slices[1].sources[0].layer_range == (1, 4)
    assert cfg.slices[1].sources[0].model == ModelReference.parse(f"{FIX}/llama/ft2")
    assert cfg.dtype == "float32" and cfg.out_dtype is None


def test_parameters_keep_types():
    cfg = load_config(case("ties_per_model"))
    assert cfg.parameters == {"normalize": False, "int8_mask": True, "rescale": True}
    assert cfg.parameters["normalize"] is False
    assert cfg.models[0].parameters == {"weight": 1.0, "density": 0.3}
    cfg = load_config("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    assert type(cfg.models[0].parameters["weight"]) is int


def test_conditional_parameters_parse():
    cfg = load_config(
        """
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
  single: {filter: mlp, value: 0.2}
  grad: [0.1, 0.2]
"""
    )
    t = cfg.parameters["t"]
    assert isinstance(t, list) and all(isinstance(c, ConditionalParameter) for c in t)
    assert t[0].filter == "self_attn" and t[0].value == [0, 0.5, 0.3, 0.7, 1]
    assert t[2].filter is None and t[2].value == 0.5
    assert cfg.parameters["single"] == ConditionalParameter(value=0.2, filter="mlp")
    assert cfg.parameters["grad"] == [0.1, 0.2]
    assert load_config(cfg.to_yaml()) == cfg
    assert "[0, 0.5, 0.3, 0.7, 1]" in cfg.to_yaml()  # numeric lists in flow style


def test_tokenizer_configs():
    cfg = load_config(case("tok_pad"))
    assert cfg.tokenizer.source == "union" and cfg.tokenizer.pad_to_multiple_of == 64
    assert effective_tokenizer_source(cfg) == "union"
    assert effective_tokenizer_source(load_config(case("tok_base"))) == "base"
    assert effective_tokenizer_source(load_config(case("slices_linear"))) == "base"
    # the mergekitty dialect: an explicit null next to a tokenizer block
    cfg = load_config(case("tok_pad") + "tokenizer_source: null\n")
    assert effective_tokenizer_source(cfg) == "union"
    cfg = load_config("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: org/other@r\n")
    assert effective_tokenizer_source(cfg) == ModelReference.parse("org/other@r")
    cfg = load_config("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {}\n")
    assert effective_tokenizer_source(cfg) == "union"


def test_token_embedding_sources():
    cfg = load_config(
        """
merge_method: linear
models: [{model: a}, {model: b}]
tokenizer:
  source: base
  tokens:
    <|im_start|>:
      source: "path/to/chatml/model"
    <|special|>:
      source: org/m
      force: true
    <|renamed|>:
      source: {kind: model_token, model: org/m, token: "<|original|>"}
    <|by_id|>:
      source: {kind: model_token, model: org/m, token_id: 1234}
    <|zero|>:
      source: {kind: zero}
    <|default|>: {}
"""
    )
    tokens = cfg.tokenizer.tokens
    assert list(tokens) == ["<|im_start|>", "<|special|>", "<|renamed|>", "<|by_id|>", "<|zero|>", "<|default|>"]
    assert tokens["<|im_start|>"].source == ModelReference.parse("path/to/chatml/model")
    assert tokens["<|special|>"].force is True
    assert tokens["<|renamed|>"].source == ModelTokenEmbedding(model="org/m", token="<|original|>")
    assert tokens["<|by_id|>"].source.token_id == 1234
    assert isinstance(tokens["<|zero|>"].source, ZeroEmbedding)
    assert tokens["<|default|>"].source is None and tokens["<|default|>"].force is False
    assert load_config(cfg.to_yaml()) == cfg


def test_model_token_needs_exactly_one_of_token_and_id():
    base = "merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  tokens:\n    x:\n      source: {kind: model_token, model: a%s}\n"
    for extra in ("", ", token: t, token_id: 3"):
        err = error_of(base % extra)
        assert "exactly one of 'token' and 'token_id'" in str(err)
        assert err.line == 6
        assert err.key == "tokenizer.tokens.x.source"
    err = error_of(base % ", token: t" + "      force: maybe\n")
    assert err.key == "tokenizer.tokens.x.force"


def test_name_key_is_ignored():
    cfg = load_config("name: first-merge\n" + case("chat_template_chatml"))
    assert cfg.chat_template == "chatml"


def test_referenced_models_order_and_dedup():
    cfg = load_config(case("ties_per_model"))
    assert [str(r) for r in cfg.referenced_models()] == [f"{FIX}/llama/{n}" for n in ("base", "ft1", "ft2", "ft3")]
    cfg = load_config(case("slices_linear"))
    assert [str(r) for r in cfg.referenced_models()] == [f"{FIX}/llama/ft1", f"{FIX}/llama/ft2"]
    cfg = load_config(
        "merge_method: x\nslices:\n  - sources: [{model: z, layer_range: [0, 1]}, {model: y, layer_range: [0, 1]}]\n"
        "    base_model: w\n  - sources: [{model: y, layer_range: [1, 2]}]\n"
    )
    assert [str(r) for r in cfg.referenced_models()] == ["z", "y", "w"]


@pytest.mark.parametrize(
    "given, expected",
    [
        ("bfloat16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("torch.float16", "float16"),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("torch.float32", "float32"),
    ],
)
def test_dtype_aliases(given, expected):
    cfg = load_config(f"merge_method: linear\nmodels: [{{model: a}}]\ndtype: {given}\nout_dtype: {given}\n")
    assert cfg.dtype == expected and cfg.out_dtype == expected
    assert normalize_dtype(given) == expected


def test_bad_dtype():
    err = error_of("merge_method: linear\nmodels: [{model: a}]\ndtype: int8\n")
    assert err.key == "dtype" and err.line == 3
    assert "bfloat16, float16, float32" in str(err)
    err = error_of("merge_method: linear\nmodels: [{model: a}]\nout_dtype: 16\n")
    assert err.key == "out_dtype"


# ----------------------------------------------------------------------------- errors


def test_typo_top_level_key():
    err = error_of(
        """\
        models:
          - model: a
        merge_methd: linear
        """
    )
    assert "did you mean 'merge_method'?" in str(err)
    assert err.key == "merge_methd" and err.line == 3
    assert str(err).startswith("cfg.yml:3")
    assert "missing" not in str(err)  # the typo explains the missing key


def ignored_of(text: str) -> tuple[ConfigError, ...]:
    """The keys a config holds that the merge ignores (loading succeeds)."""
    return load_config(textwrap.dedent(text), source="cfg.yml").ignored_keys


def test_typo_nested_keys():
    # a typo that leaves a required key missing stays an error, and names the typo
    err = error_of(
        """\
        merge_method: passthrough
        slices:
          - sources:
              - model: a
                layer_range: [0, 2]
          - sources:
              - model: b
                layer_rang: [2, 4]
        """
    )
    assert err.key == "slices[1].sources[0].layer_rang" and err.line == 8
    assert "did you mean 'layer_range'?" in str(err)

    # one that leaves nothing missing is ignored, as the other tools ignore it, and reported
    (ignored,) = ignored_of(
        """\
        merge_method: linear
        models:
          - model: a
            paramters:
              weight: 0.5
        """
    )
    assert ignored.key == "models[0].paramters" and ignored.line == 4
    assert "is ignored, as mergekit ignores it; did you mean 'parameters'?" in str(ignored)

    (ignored,) = ignored_of("merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  sourc: union\n")
    assert ignored.key == "tokenizer.sourc" and ignored.line == 4 and "did you mean 'source'?" in str(ignored)

    text = "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [{fliter: mlp, value: 1}, {value: 2}]\n"
    (ignored,) = ignored_of(text)
    assert ignored.key == "parameters.weight[0].fliter" and "did you mean 'filter'?" in str(ignored)
    # without its filter the entry applies to every tensor, as in the other tools
    assert load_config(text).parameters["weight"][0] == ConditionalParameter(value=1, filter=None)


def test_unknown_key_without_close_match_lists_allowed():
    (ignored,) = ignored_of("merge_method: linear\nmodels: [{model: a, zzz: 1}]\n")
    assert "'zzz' is not a config key here" in str(ignored) and "keys here: model, parameters" in str(ignored)


def test_slices_and_models_both():
    err = error_of(
        """\
        merge_method: linear
        models:
          - model: a
        slices:
          - sources:
              - model: a
                layer_range: [0, 1]
        """
    )
    assert "not both" in str(err) and err.key == "models" and err.line == 2


def test_neither_slices_nor_models():
    err = error_of("merge_method: linear\n")
    assert "'models'" in str(err) and "'slices'" in str(err)
    err = error_of("merge_method: linear\nmodels: []\n")
    assert "empty" in str(err) and err.key == "models"


def test_tokenizer_and_tokenizer_source():
    err = error_of("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\ntokenizer:\n  source: union\n")
    assert "not both" in str(err) and err.key == "tokenizer_source" and err.line == 3


@pytest.mark.parametrize("rng", ["[3, 1]", "[2, 2]", "[-1, 2]", "[0]", "[0, 1, 2]", "[0, 1.5]", "'0-4'"])
def test_bad_layer_range(rng):
    err = error_of(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: {rng}\n")
    assert err.key.startswith("slices[0].sources[0].layer_range")
    assert err.line == 5


def test_layer_range_message_explains_half_open():
    err = error_of("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]\n")
    assert "0 <= start < stop" in str(err) and "half-open" in str(err)


def test_missing_layer_range_and_empty_sources():
    err = error_of("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n")
    assert "missing required key 'layer_range'" in str(err) and err.key == "slices[0].sources[0].layer_range"
    assert err.line == 4
    err = error_of("merge_method: passthrough\nslices:\n  - sources: []\n")
    assert err.key == "slices[0].sources"


@pytest.mark.parametrize(
    "value, key_suffix",
    [
        ("[]", ""),
        ("[0.1, x]", "[1]"),
        ("[0.1, {value: 1}]", ""),
        ("null", ""),
        ("{filter: mlp}", ""),
        ("[{value: 1, filter: 3}]", "[0].filter"),
        ("[true, false]", "[0]"),
    ],
)
def test_bad_parameter_values(value, key_suffix):
    err = error_of(f"merge_method: linear\nmodels: [{{model: a}}]\nparameters:\n  weight: {value}\n")
    assert err.key == "parameters.weight" + key_suffix
    assert err.line == 4


def test_bad_model_references():
    err = error_of("merge_method: linear\nmodels:\n  - model: a+b+c\n")
    assert err.key == "models[0].model" and err.line == 3 and "'+'" in str(err)
    err = error_of("merge_method: linear\nmodels:\n  - model: a@b@c\n")
    assert "'@'" in str(err)
    err = error_of("merge_method: linear\nmodels:\n  - model: [a]\n")
    assert err.key == "models[0].model"
    cfg = load_config(
        "merge_method: linear\nmodels:\n  - model: {model: {path: org/m, revision: r}, override_architecture: MistralForCausalLM}\n"
    )
    ref = cfg.models[0].model
    assert ref.override_architecture == "MistralForCausalLM" and str(ref) == "org/m@r"
    assert load_config(cfg.to_yaml()) == cfg


def test_yaml_syntax_error_line():
    err = error_of("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [0.1, 0.2}\n")
    assert err.line == 4 and "YAML syntax error" in str(err)
    err = error_of("merge_method: linear\n  models: x\n")
    assert err.line == 2


def test_duplicate_key():
    err = error_of("merge_method: linear\nmodels: [{model: a}]\nmerge_method: ties\n")
    assert err.key == "merge_method" and err.line == 3 and "duplicate" in str(err)


def test_not_a_mapping():
    for text in ("", "- a\n- b\n", "just text\n"):
        with pytest.raises(ConfigError, match="mapping"):
            load_config(text)


def test_unsupported_keys_explained():
    err = error_of("merge_method: linear\nmodels: [{model: a}]\ninput_model_parameters: {}\n")
    assert "models[*].parameters" in str(err) and err.line == 3


def test_several_problems_reported_together():
    err = error_of("merge_method: linear\nmodels: [{model: a}]\ndtype: fp8\nrandom_seed: -1\n")
    assert err.key == "dtype" and "1 more problem" in str(err) and "random_seed (line 4)" in str(err)


def test_check_method():
    cfg = load_config(case("err_unknown_method"))  # parses: method names are not checked while parsing
    with pytest.raises(ConfigError) as info:
        check_method(cfg)
    assert info.value.key == "merge_method" and info.value.line == 5
    for typo, right in (
        ("linera", "linear"),
        ("Linear", "linear"),
        ("task_arithmatic", "task_arithmetic"),
        ("passthru", "passthrough"),
    ):
        cfg = load_config(f"merge_method: {typo}\nmodels: [{{model: a}}]\n", source="c.yml")
        with pytest.raises(ConfigError, match=f"did you mean '{right}'"):
            check_method(cfg)
    assert check_method(load_config("merge_method: linear\nmodels: [{model: a}]\n")).name == "linear"


def test_load_config_file(tmp_path):
    p = tmp_path / "merge.yml"
    p.write_text(case("slices_linear"))
    cfg = load_config_file(p)
    assert cfg.source_text == case("slices_linear") and cfg.source_name == str(p)
    with pytest.raises(ConfigError, match="not found: .*missing.yml"):
        load_config_file(tmp_path / "missing.yml")
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: []}\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(p)
    assert info.value.source == str(p) and info.value.line == 4 and str(info.value).startswith(f"{p}:4")


def test_python_construction_and_frozen():
    cfg = MergeConfiguration(
        merge_method="linear", models=[{"model": "a", "parameters": {"weight": 0.5}}], dtype="bf16"
    )
    assert cfg.dtype == "bfloat16" and cfg.source_text is None
    assert cfg.models[0].model == ModelReference.parse("a")
    with pytest.raises((TypeError, AttributeError, ValueError)):
        cfg.merge_method = "ties"  # type: ignore[misc]
    assert "merge_method: linear" in cfg.to_yaml()


def test_import_is_light():
    code = "import sys, mergekitty.config, mergekitty.params, mergekitty.refs; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_yaml_anchors_and_merge_keys():
    cfg = load_config(
        """\
merge_method: ties
models:
  - model: b
    parameters: &shared
      weight: 0.9
  - model: a
    parameters:
      <<: *shared
      weight: 0.5
      density: 0.3
"""
    )
    assert cfg.models[0].parameters == {"weight": 0.9}
    assert cfg.models[1].parameters == {"weight": 0.5, "density": 0.3}
    assert cfg.line_of("models[1].parameters.weight") == 9
    assert cfg.line_of(("models", 1, "parameters", "density")) == 10


def test_non_string_mapping_key():
    err = error_of("merge_method: x\nmodels: [{model: a}]\ntokenizer:\n  tokens:\n    1: {}\n")
    assert err.key == "tokenizer.tokens[1]" and err.line == 5 and "quotes" in str(err)


def test_parameter_name_problems():
    from mergekitty.config import parameter_name_problems

    cfg = load_config(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 1, weight: 1}\nparameters:\n  normalize: true\n"
    )
    method = check_method(cfg)
    problems = parameter_name_problems(cfg, method)
    assert len(problems) == 1
    assert problems[0].key == "models[0].parameters.wieght" and problems[0].line == 4
    assert "did you mean 'weight'?" in str(problems[0])
