"""Hostile or broken configs and model files: each is one typed error naming the file (and the
key or line), found in bounded time and memory, never a traceback. YAML alias bombs, deep
nesting, forbidden characters, values Python cannot hold, size-like settings that would allocate
terabytes, and malformed ``config.json`` / tokenizer / adapter files; then seeded random
mutations of a valid config and of valid model files fed to the planner."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from helpers import run_cli
from mergekitty.config import load_config, load_config_file
from mergekitty.errors import ConfigError, MergekittyError, ModelFormatError
from mergekitty.io.checkpoint import Checkpoint
from mergekitty.limits import MAX_NESTING
from mergekitty.tokenizer.vocab import read_vocabulary

pytestmark = pytest.mark.faults


def _bomb(levels: int, width: int = 9) -> str:
    """``a0: &a0 [x, x, ...]``, ``a1: &a1 [*a0, *a0, ...]``...: width**levels values."""
    lines = ["a0: &a0 [" + ",".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def model(llama, tmp_path):
    """A copy of a tiny model whose files a test may break."""
    return Path(shutil.copytree(llama["ft1"], tmp_path / "model"))


# ------------------------------------------------------------------ YAML


@pytest.mark.parametrize(
    "text",
    [
        _bomb(7),  # 4.8 million values in 304 bytes
        # the same through merge keys: each mapping merges the previous one nine times
        "a0: &a0 {k: 1}\n"
        + "".join(f"a{i}: &a{i} {{<<: [{','.join([f'*a{i - 1}'] * 9)}], k{i}: 1}}\n" for i in range(1, 8)),
    ],
    ids=["sequences", "merge-keys"],
)
def test_an_alias_bomb_is_refused_at_once(tmp_path, text):
    config = tmp_path / "bomb.yml"
    config.write_text(text)
    assert len(text) < 500
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="more than .* values once its aliases .* are expanded") as info:
        load_config_file(config)
    assert time.perf_counter() - start < 1.0
    assert info.value.source == str(config) and info.value.line is not None


def test_anchors_for_shared_parameters_keep_working():
    """Anchors, aliases and merge keys of real recipes load as before, and an error inside an
    aliased block still points at a line."""
    text = (
        "merge_method: ties\n"
        "base_model: base\n"
        "parameters: &defaults {normalize: true, int8_mask: false}\n"
        "models:\n"
        "  - model: ft1\n"
        "    parameters: &p {weight: &w [0.2, 0.8], density: 0.5}\n"
        "  - model: ft2\n"
        "    parameters: {<<: *p, density: 0.7}\n"
        "  - model: ft3\n"
        "    parameters: {weight: *w, density: 0.3}\n"
    )
    config = load_config(text)
    assert config.parameters == {"normalize": True, "int8_mask": False}
    assert [m.parameters for m in config.models] == [
        {"weight": [0.2, 0.8], "density": 0.5},
        {"weight": [0.2, 0.8], "density": 0.7},
        {"weight": [0.2, 0.8], "density": 0.3},
    ]
    with pytest.raises(ConfigError, match="gradient values must be numbers") as info:
        load_config(text.replace("[0.2, 0.8]", "[0.2, x]"))
    assert info.value.line == 6


def test_a_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="recursive alias") as info:
        load_config("merge_method: linear\nmodels: &m [{model: a}, *m]\n")
    assert info.value.line == 2


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, "merge_method: linear\nmodels:\n" + "".join("  " * i + "- \n" for i in range(1, 200))],
    ids=["flow", "block"],
)
def test_deep_nesting_is_refused_with_its_line(text):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"nested more than {MAX_NESTING} levels") as info:
        load_config(text)
    assert time.perf_counter() - start < 1.0
    assert info.value.line is not None


def test_nesting_through_aliases_is_refused():
    inner = "[" * 40 + "1" + "]" * 40
    with pytest.raises(ConfigError, match=f"nested more than {MAX_NESTING} levels"):
        load_config(f"a: &a {inner}\nb: {'[' * 40}*a{']' * 40}\n")


def test_a_control_character_names_file_line_and_column(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\x01b\n")
    with pytest.raises(ConfigError, match=r"U\+0001 is not allowed in YAML.*\(column 13\)") as info:
        load_config_file(config)
    assert info.value.source == str(config) and info.value.line == 3
    proc = run_cli("mergekitty-yaml", config, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{config}:3" in proc.stderr and "column 13" in proc.stderr


def test_the_cli_prints_markup_and_escape_sequences_from_the_input_as_text(tmp_path):
    """A message quoting the input (a path with ``[/x]``, an escape sequence) is shown as text:
    neither read as rich markup (a MarkupError traceback) nor sent raw to the terminal."""
    config = tmp_path / "merge.yml"
    config.write_text('merge_method: linear\nmodels:\n  - model: "./nope[/x]\\e[2J"\n')
    proc = run_cli("mergekitty-yaml", config, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "./nope[/x]\\x1b[2J" in proc.stderr and "\x1b" not in proc.stderr


def test_invalid_utf8_names_line_and_column(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_bytes(b"merge_method: linear\nmodels:\n  - model: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text: byte 0xff .*\(column 12\)") as info:
        load_config_file(config)
    assert info.value.source == str(config) and info.value.line == 3


@pytest.mark.parametrize("value", ["1" * 5000, "2001-02-30"], ids=["5000-digit-int", "impossible-date"])
def test_a_value_python_cannot_hold_names_its_line(value):
    with pytest.raises(ConfigError, match="cannot read the value") as info:
        load_config(f"merge_method: linear\nmodels:\n  - model: a\nrandom_seed: {value}\n")
    assert info.value.line == 4


def test_a_huge_config_file_is_refused_before_parsing(tmp_path):
    config = tmp_path / "huge.yml"
    config.write_text("# padding\n" * 300_000)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="larger than 2 MiB"):
        load_config_file(config)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("setting", "key", "message"),
    [
        ("pad_to_multiple_of: 1000000000000", "tokenizer.pad_to_multiple_of", "at most 65,536"),
        (
            "tokens: {x: {source: {kind: model_token, model: a, token_id: 100000000000}}}",
            "tokenizer.tokens.x.source.token_id",
            "below 16,777,216",
        ),
    ],
    ids=["pad_to_multiple_of", "token_id"],
)
def test_size_like_settings_are_bounded(setting, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(f"merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  {setting}\n")
    assert info.value.key == key and info.value.line == 5


def test_a_chat_template_nested_too_deeply_is_a_config_error():
    from mergekitty.tokenizer import resolve_chat_template

    with pytest.raises(ConfigError, match="nests blocks or brackets too deeply") as info:
        resolve_chat_template("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", [])
    assert info.value.key == "chat_template"


def test_a_model_path_the_system_refuses_is_a_typed_error():
    from mergekitty.api import plan_merge
    from mergekitty.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="cannot be used: File name too long"):
        plan_merge("merge_method: linear\nmodels:\n  - model: " + "a/" * 3000 + "\n")


# ------------------------------------------------------------------ config.json


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("architectures", 5, "'architectures' must be a list of class names"),
        ("architectures", [5], "'architectures' must be a list of class names"),
        ("model_type", ["llama"], "'model_type' must be a string"),
        ("num_hidden_layers", "x", "'num_hidden_layers' must be a non-negative integer"),
        ("vocab_size", -1, "'vocab_size' must be a positive integer"),
        ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
        ("mlp_only_layers", 3, "'mlp_only_layers' must be a list of layer indices"),
        ("text_config", {"num_hidden_layers": 2.5}, "'text_config.num_hidden_layers' must be a non-negative integer"),
        ("text_config", "llama", "'text_config' must be a JSON object"),
    ],
)
def test_config_json_values_of_the_wrong_type_name_file_and_key(model, key, value, message):
    _edit_json(model / "config.json", lambda c: c.__setitem__(key, value))
    with pytest.raises(ModelFormatError, match=message) as info:
        Checkpoint(model).config()
    assert str(model / "config.json") in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "expected a JSON object"),
        (b'{"model_type": "\xff"}', r"not UTF-8 text \(byte 0xff at line 1, column 17\)"),
        (b'{"a": 1,\n "b": }', r"invalid JSON: .*\(line 2, column 7\)"),
        (b"[" * 100_000 + b"]" * 100_000, f"nested more than {MAX_NESTING} levels"),
        (b'{"x": ' + b"[" * 500 + b"]" * 500 + b"}", f"nested more than {MAX_NESTING} levels"),
    ],
    ids=["not-an-object", "invalid-utf8", "invalid-json", "recursion-deep", "deepcopy-deep"],
)
def test_a_broken_config_json_names_the_file(model, content, message):
    (model / "config.json").write_bytes(content)
    with pytest.raises(ModelFormatError, match=message) as info:
        Checkpoint(model).config()
    assert str(model / "config.json") in str(info.value)


def test_the_planner_reports_a_broken_config_json_in_one_line(llama, model, tmp_path):
    _edit_json(model / "config.json", lambda c: c.__setitem__("architectures", 5))
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {llama['base']}\n  - model: {model}\n")
    proc = run_cli("mergekitty-yaml", config, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "config.json: 'architectures' must be a list" in proc.stderr and f"{config}:4" in proc.stderr


def test_a_deep_index_names_the_file(model):
    (model / "model.safetensors.index.json").write_text("[" * 100_000)
    with pytest.raises(ModelFormatError, match=f"index.json: JSON nested more than {MAX_NESTING}"):
        Checkpoint(model)


# ------------------------------------------------------------------ tokenizer files


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["model"]["vocab"].update(zz="7"), r"'model.vocab.zz' is \"7\"; a token id must be an integer"),
        (lambda t: t["model"]["vocab"].update(zz=1.5), r"'model.vocab.zz' is 1.5"),
        (lambda t: t["model"]["vocab"].update(zz=10**12), r"'model.vocab.zz' is 1000000000000"),
        (lambda t: t["model"]["vocab"].update(zz=-1), r"'model.vocab.zz' is -1"),
        (lambda t: t["model"].update(vocab=5), r"'model.vocab' is neither a mapping nor a list"),
        (lambda t: t["model"].update(type="Unigram", vocab=[["a", 0.0], [5, 0.0]]), r"'model.vocab\[1\]' must be"),
        (lambda t: t["model"].update(merges=[["a", "b"], ["c"]]), r"'model.merges\[1\]' must be"),
        (lambda t: t["model"].update(merges="a b"), r"'model.merges' must be a list"),
        (lambda t: t.update(added_tokens=5), r"'added_tokens' must be a list"),
        (lambda t: t["added_tokens"].append(7), r"'added_tokens\[3\]' must be a JSON object"),
        (lambda t: t["added_tokens"].append({"content": "q"}), r"'added_tokens\[3\].id' is null"),
        (lambda t: t["added_tokens"].append({"id": 90}), r"'added_tokens\[3\].content' must be the token text"),
        (lambda t: t["added_tokens"].append({"id": 90, "content": "q", "special": "no"}), r"\.special' must be true"),
    ],
)
def test_tokenizer_json_values_of_the_wrong_type_name_file_and_key(model, edit, message):
    _edit_json(model / "tokenizer.json", edit)
    with pytest.raises(ModelFormatError, match=message) as info:
        read_vocabulary(model)
    assert str(model / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.json", "[" * 100_000, f"nested more than {MAX_NESTING} levels"),
        ("tokenizer_config.json", "[1]", "expected a JSON object"),
        ("tokenizer_config.json", '{"added_tokens_decoder": [1]}', "'added_tokens_decoder' must be a JSON object"),
        ("tokenizer_config.json", '{"added_tokens_decoder": {"x": {"content": "q"}}}', "'added_tokens_decoder.x' is"),
        ("tokenizer_config.json", '{"added_tokens_decoder": {"5": {"content": 5}}}', r"\.content' must be the token"),
        ("added_tokens.json", '{"q": "x"}', "'q' is \"x\"; a token id must be"),
    ],
)
def test_broken_tokenizer_side_files_name_the_file(model, name, content, message):
    (model / name).write_text(content)
    with pytest.raises(ModelFormatError, match=message) as info:
        read_vocabulary(model)
    assert str(model / name) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vocab.json", '{"a": 0, "b": "1"}', "'b' is \"1\""),
        ("vocab.txt", b"a\nb\xff\n", r"not UTF-8 text \(byte 0xff at line 2, column 2\)"),
    ],
)
def test_broken_slow_tokenizer_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ModelFormatError, match=message) as info:
        read_vocabulary(tmp_path)
    assert str(path) in str(info.value)


def test_a_broken_chat_template_file_names_the_file(model):
    from mergekitty.tokenizer import model_chat_template

    (model / "chat_template.jinja").write_bytes(b"{{ \xff }}")
    with pytest.raises(ModelFormatError, match="chat_template.jinja: not UTF-8 text"):
        model_chat_template(model)
    (model / "chat_template.jinja").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": ["x"], "template": "t"}]}))
    assert model_chat_template(model) is None


# ------------------------------------------------------------------ LoRA adapter_config.json


def _adapter(directory: Path, **config) -> Path:
    import torch
    from safetensors.torch import save_file

    directory.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(2, 8), f"{prefix}.lora_B.weight": torch.zeros(8, 2)},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    return directory


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": "2"}, "'r' must be a positive integer"),
        ({"lora_alpha": "x"}, "'lora_alpha' must be a finite number"),
        ({"alpha_pattern": {"q_proj": "x"}}, "'alpha_pattern' must be an object mapping module names to finite"),
        ({"rank_pattern": [1]}, "'rank_pattern' must be an object"),
        ({"use_rslora": "false"}, "'use_rslora' must be true or false"),
        ({"peft_type": ["LORA"]}, "peft_type is"),
    ],
)
def test_adapter_config_values_of_the_wrong_type_name_file_and_key(tmp_path, config, message):
    from mergekitty.lora.adapter import Adapter

    directory = _adapter(tmp_path / "adapter", **config)
    assert Adapter(_adapter(tmp_path / "fine")).modules  # the same adapter without the bad value reads
    with pytest.raises(ModelFormatError, match=message) as info:
        Adapter(directory)
    assert str(directory / "adapter_config.json") in str(info.value)


# ------------------------------------------------------------------ fuzzing through the planner

_HOSTILE_SNIPPETS = [
    "\x00",
    "\x01",
    "\x7f",
    "\ud800",
    "&a ",
    "*a",
    "*b",
    "<<: *a",
    "!!binary x",
    "!!python/object:os.system",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "'",
    '"',
    "#",
    "?",
    "|",
    ">",
    "1e999",
    "-1",
    "0",
    "99999999999999999999999",
    "a/" * 2100,
    "1" * 4400,
    "2001-02-30",
    "null",
    "~",
    "true",
    "[[[[[[[[",
    "slices",
    "models",
]


def _mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text) + 1)
        op = rng.random()
        if op < 0.5:
            text = text[:i] + rng.choice(_HOSTILE_SNIPPETS) + text[i:]
        elif op < 0.75:
            text = text[:i] + text[i + rng.randint(1, 12) :]
        else:
            j = rng.randrange(len(text) + 1)
            text = text[:i] + text[min(i, j) : max(i, j)][:200] + text[i:]
    return text


_HOSTILE_VALUES = [
    None,
    True,
    -1,
    0,
    2**70,
    1.5,
    1e308,
    float("nan"),
    "",
    "x",
    "-1",
    [],
    [None],
    {},
    {"a": [1]},
    [[[[[[[[[[1]]]]]]]]]],
    "\u0000",
    ["LlamaForCausalLM", 5],
    {"vocab": 5},
]


# keys that planning reads, in config.json and tokenizer.json: chosen more often than the others
_READ_KEYS = [
    "architectures",
    "model_type",
    "num_hidden_layers",
    "vocab_size",
    "tie_word_embeddings",
    "text_config",
    "dtype",
    "model",
    "vocab",
    "type",
    "merges",
    "added_tokens",
    "id",
    "content",
    "special",
]


def _mutate_json(rng: random.Random, data):
    """``data`` with one value somewhere in it replaced, dropped or wrapped."""
    if not isinstance(data, (dict, list)) or not data or rng.random() < 0.35:
        return rng.choice(_HOSTILE_VALUES) if rng.random() < 0.8 else [data]
    keys = list(data) if isinstance(data, dict) else list(range(len(data)))
    read = [k for k in keys if k in _READ_KEYS]
    key = rng.choice(read if read and rng.random() < 0.6 else keys)
    if isinstance(data, dict) and rng.random() < 0.15:
        del data[key]
    elif key in _READ_KEYS and rng.random() < 0.5:
        data[key] = rng.choice(_HOSTILE_VALUES)
    else:
        data[key] = _mutate_json(rng, data[key])
    return data


def _plan(text: str) -> None:
    from mergekitty.api import plan_merge

    try:
        plan_merge(text)
    except MergekittyError as exc:
        assert str(exc).strip()
    except Exception as exc:  # anything else is a bug: say which input gave it
        raise AssertionError(f"{type(exc).__name__}: {exc}\nfor the config:\n{text}") from exc


def test_fuzzed_configs_plan_or_fail_with_a_typed_error(llama):
    """Seeded random edits of a valid config with anchors, merge keys and a tokenizer block."""
    text = (
        "merge_method: ties\n"
        f"base_model: {llama['base']}\n"
        "parameters: &defaults {normalize: true}\n"
        "models:\n"
        f"  - model: {llama['ft1']}\n"
        "    parameters: &p {weight: &w [0.2, 0.8], density: 0.5}\n"
        f"  - model: {llama['ft2']}\n"
        "    parameters: {<<: *p, density: 0.7}\n"
        "dtype: float32\n"
        "tokenizer:\n"
        "  source: union\n"
        "  pad_to_multiple_of: 8\n"
        f"  tokens: {{'<new>': {{source: {{kind: model_token, model: {llama['ft1']}, token_id: 3}}}}}}\n"
        "chat_template: chatml\n"
    )
    _plan(text)  # the unmutated config plans
    rng = random.Random(1234)
    for _ in range(200):
        _plan(_mutate_text(rng, text))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_fuzzed_model_files_plan_or_fail_with_a_typed_error(llama, model, name):
    text = (
        "merge_method: linear\n"
        f"base_model: {llama['base']}\n"
        "models:\n"
        f"  - model: {llama['base']}\n"
        "    parameters: {weight: 0.5}\n"
        f"  - model: {model}\n"
        "    parameters: {weight: 0.5}\n"
        "tokenizer: {source: union}\n"
    )
    path = model / name
    original = path.read_text()
    rng = random.Random(name)
    for i in range(150):
        if i % 10 == 9:  # now and then the text itself, cut or edited
            path.write_bytes(_mutate_text(rng, original).encode("utf-8", "surrogatepass"))
        else:
            path.write_text(json.dumps(_mutate_json(rng, json.loads(original))))
        _plan(text)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100 + "1" + "}" * 100, "[1]", '{"__t": 5}', "1" * 5000])
def test_a_hostile_plan_file_is_a_plan_error(text):
    from mergekitty.errors import PlanError
    from mergekitty.plan import MergePlan

    with pytest.raises(PlanError):
        MergePlan.from_json(text)
