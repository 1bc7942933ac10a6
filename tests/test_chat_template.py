"""chat_template: built-in templates, auto selection, custom Jinja, errors, and the CLI output."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from helpers import run_cli
from mergekitty.errors import ConfigError
from mergekitty.tokenizer import BUILTIN_TEMPLATES, builtin_template, model_chat_template, resolve_chat_template

CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CONVERSATION]

# Written by hand from each format's definition (the fixture tokenizer's bos/eos are <s> and </s>).
EXPECTED = {
    "chatml": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] hi [/INST] hello</s>[INST] bye [/INST]",
    "alpaca": "### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:\nbye\n\n### Response:\n",
    "exaone": "[|user|]hi\n[|assistant|]hello[|endofturn|]\n[|user|]bye\n[|assistant|]",
}
EXPECTED_WITH_SYSTEM = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n" + EXPECTED["chatml"],
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" + EXPECTED["llama3"][len("<s>") :],
    "mistral": "<s>[INST] Be brief.\n\nhi [/INST] hello</s>[INST] bye [/INST]",
    "alpaca": "Be brief.\n\n" + EXPECTED["alpaca"],
    "exaone": "[|system|]Be brief.[|endofturn|]\n" + EXPECTED["exaone"],
}
CUSTOM = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture
def tokenizer(llama):
    return AutoTokenizer.from_pretrained(llama["base"])


def _render(tok, template, messages, generation_prompt=True):
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_every_builtin_is_tested():
    assert set(EXPECTED) == set(BUILTIN_TEMPLATES) == set(EXPECTED_WITH_SYSTEM)


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_renders(tokenizer, name):
    template = resolve_chat_template(name, [])
    assert template == builtin_template(name)
    assert _render(tokenizer, template, CONVERSATION) == EXPECTED[name]
    assert _render(tokenizer, template, WITH_SYSTEM) == EXPECTED_WITH_SYSTEM[name]


def test_builtin_names_are_case_insensitive():
    assert resolve_chat_template(" ChatML ", []) == builtin_template("chatml")


def test_generation_prompt_is_optional(tokenizer):
    assert _render(tokenizer, builtin_template("chatml"), CONVERSATION[:2], False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


@pytest.mark.parametrize("name", ["mistral", "alpaca", "exaone"])
def test_unknown_role_is_an_error(tokenizer, name):
    with pytest.raises(Exception, match="roles"):
        _render(tokenizer, builtin_template(name), [{"role": "tool", "content": "x"}])


def _copy_models(llama, tmp_path, names=("base", "ft1", "ft2")):
    out = []
    for n in names:
        dst = tmp_path / n
        shutil.copytree(llama[n], dst)
        out.append(dst)
    return out


def _set_in_config(model_dir, template):
    f = model_dir / "tokenizer_config.json"
    data = json.loads(f.read_text())
    data["chat_template"] = template
    f.write_text(json.dumps(data))


def test_model_template_sources(llama, tmp_path):
    (m,) = _copy_models(llama, tmp_path, ("base",))
    assert model_chat_template(m) is None
    (m / "chat_template.json").write_text(json.dumps({"chat_template": "from json "}))
    assert model_chat_template(m) == "from json"
    _set_in_config(m, [{"name": "default", "template": " from config"}, {"name": "tool_use", "template": "x"}])
    assert model_chat_template(m) == "from config"
    (m / "chat_template.jinja").write_text("from jinja\n")
    assert model_chat_template(m) == "from jinja"  # the file transformers reads first wins


def test_auto_picks_the_majority(llama, tmp_path):
    base, ft1, ft2 = _copy_models(llama, tmp_path)
    chatml, alpaca = builtin_template("chatml"), builtin_template("alpaca")
    _set_in_config(base, alpaca)  # first in config order, but outvoted
    _set_in_config(ft1, chatml)
    (ft2 / "chat_template.jinja").write_text(chatml + "\n")  # same template, other file, extra whitespace
    assert resolve_chat_template("auto", [base, ft1, ft2]) == chatml.strip()


def test_auto_tie_goes_to_config_order(llama, tmp_path):
    base, ft1, ft2 = _copy_models(llama, tmp_path)
    _set_in_config(ft1, builtin_template("mistral"))
    _set_in_config(ft2, builtin_template("exaone"))
    assert resolve_chat_template("auto", [base, ft1, ft2]) == builtin_template("mistral").strip()
    assert resolve_chat_template("auto", [base, ft2, ft1]) == builtin_template("exaone").strip()


def test_auto_without_templates_keeps_donor(llama, tmp_path):
    assert resolve_chat_template("auto", _copy_models(llama, tmp_path)) is None


def test_custom_template_is_verbatim():
    assert resolve_chat_template(CUSTOM, []) == CUSTOM
    assert resolve_chat_template("{{ bos_token }}", []) == "{{ bos_token }}"


@pytest.mark.parametrize(
    "value, match",
    [
        ("chatm", "did you mean 'chatml'"),
        ("lama3", "did you mean 'llama3'"),
        ("autoo", "did you mean 'auto'"),
        ("something else", "alpaca, chatml, exaone, llama3, mistral"),
        ("{% for m in messages %}", "does not parse"),
    ],
)
def test_bad_value(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_chat_template(value, [])
    assert info.value.key == "chat_template"


def test_no_suggestion_for_unrelated_text():
    with pytest.raises(ConfigError) as info:
        resolve_chat_template("something else", [])
    assert "did you mean" not in str(info.value)


def _merge_yaml(models, template):
    lines = ["models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {weight: 1.0}"]
    lines += ["merge_method: linear", "dtype: float32", f"chat_template: {json.dumps(template)}", ""]
    return "\n".join(lines)


def _load_and_render(out):
    tok = AutoTokenizer.from_pretrained(out)
    return tok, tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_cli_builtin(llama, tmp_path, write_yaml):
    base, ft1 = _copy_models(llama, tmp_path, ("base", "ft1"))
    _set_in_config(base, "{{ 'stale donor template' }}")  # the donor's own template must not survive
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", write_yaml(_merge_yaml([base, ft1], "chatml")), out, "--quiet")
    _, text = _load_and_render(out)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (out / "chat_template.jinja").read_text() == builtin_template("chatml")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_cli_custom_round_trips(llama, tmp_path, write_yaml):
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", write_yaml(_merge_yaml([llama["base"], llama["ft1"]], CUSTOM)), out, "--quiet")
    tok, text = _load_and_render(out)
    assert tok.chat_template == CUSTOM
    assert text == "<user>hi</user><assistant>"


@pytest.mark.slow
def test_cli_auto(llama, tmp_path, write_yaml):
    base, ft1, ft2 = _copy_models(llama, tmp_path)
    _set_in_config(base, builtin_template("alpaca"))
    _set_in_config(ft1, builtin_template("llama3"))
    (ft2 / "chat_template.jinja").write_text(builtin_template("llama3"))
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", write_yaml(_merge_yaml([base, ft1, ft2], "auto")), out, "--quiet")
    _, text = _load_and_render(out)
    assert (
        text
        == "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_cli_auto_without_templates_copies_donor(llama, tmp_path, write_yaml):
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", write_yaml(_merge_yaml([llama["base"], llama["ft1"]], "auto")), out, "--quiet")
    assert not (out / "chat_template.jinja").exists()
    assert (out / "tokenizer_config.json").read_bytes() == (llama["base"] / "tokenizer_config.json").read_bytes()


def test_cli_bad_name_fails_before_writing(llama, tmp_path, write_yaml):
    out = tmp_path / "out"
    proc = run_cli(
        "mergekitty-yaml", write_yaml(_merge_yaml([llama["base"], llama["ft1"]], "mistrl")), out, "--quiet", check=False
    )
    assert proc.returncode != 0
    assert "chat_template" in proc.stderr and "did you mean 'mistral'" in proc.stderr
    assert not out.exists()
