"""Configs written the way published recipes are: YAML 1.2 exponent floats, keys and parameters
the other tools ignore (accepted with one warning naming the key and its line, errors with
``strict``), and several documents in one file (one clear error). Each accepted recipe merges to
exactly what the same config without the ignored keys gives."""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch

from helpers import read_state
from mergekitty import run_merge
from mergekitty.config import load_config
from mergekitty.errors import ConfigError


def _merge(text: str, out, caplog, **options):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_merge(load_config(textwrap.dedent(text), source="recipe.yml"), out, quiet=True, random_seed=1, **options)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return read_state(out), warnings


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# (recipe as published, the same recipe without what the other tools ignore, the ignored keys
# with their lines and what each warning must say)
RECIPES = {
    "karcher-exponent-floats": (
        """\
        merge_method: karcher
        models:
          - model: {ft1}
          - model: {ft2}
        parameters:
          tol: 1e-5
          max_iter: 20
        """,
        """\
        merge_method: karcher
        models:
          - model: {ft1}
          - model: {ft2}
        parameters:
          tol: 0.00001
          max_iter: 20
        """,
        [],
    ),
    "top-level-typos-and-foreign-keys": (
        """\
        # a slerp as shared on a model card
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 2]
              - model: {ft1}
                layer_range: [0, 2]
        merge_method: slerp
        base_model: {base}
        parameters:
          t: 0.3
        dype: bfloat16
        select_topk: 0.5
        pad_to_multiple_of: 64
        int8_mask: true
        """,
        """\
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 2]
              - model: {ft1}
                layer_range: [0, 2]
        merge_method: slerp
        base_model: {base}
        parameters:
          t: 0.3
        """,
        [
            (12, "'dype'", "did you mean 'dtype'?"),
            (13, "'select_topk'", "ignored"),
            (14, "'pad_to_multiple_of'", "ignored"),
            (15, "'int8_mask'", "ignored"),
        ],
    ),
    "string-and-unused-parameters": (
        """\
        merge_method: ties
        base_model: {base}
        models:
          - model: {ft1}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {ft2}
            parameters: {{weight: 0.4, density: 0.5}}
        parameters:
          normalize: true
          int_space: cs
          dtype: bfloat16
        """,
        """\
        merge_method: ties
        base_model: {base}
        models:
          - model: {ft1}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {ft2}
            parameters: {{weight: 0.4, density: 0.5}}
        parameters:
          normalize: true
        """,
        [(10, "'int_space'", "ignored"), (11, "'dtype'", "ignored")],
    ),
    "revision-on-a-slice-source": (
        """\
        merge_method: linear
        slices:
          - sources:
              - model: {ft1}
                revision: main
                layer_range: [0, 2]
                parameters: {{weight: 0.5}}
              - model: {ft2}
                layer_range: [0, 2]
                parameters: {{weight: 0.5}}
        """,
        """\
        merge_method: linear
        slices:
          - sources:
              - model: {ft1}
                layer_range: [0, 2]
                parameters: {{weight: 0.5}}
              - model: {ft2}
                layer_range: [0, 2]
                parameters: {{weight: 0.5}}
        """,
        [(5, "'revision'", "ignored")],
    ),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_published_recipe_merges_as_without_the_ignored_keys(name, llama, tmp_path, caplog):
    published, plain, expected = RECIPES[name]
    paths = {k: str(v) for k, v in llama.items()}
    got, warnings = _merge(published.format(**paths), tmp_path / "published", caplog)
    want, _ = _merge(plain.format(**paths), tmp_path / "plain", caplog)
    _same(got, want)
    ignored = [w for w in warnings if "as mergekit ignores it" in w]
    assert len(ignored) == len(expected), warnings
    for line, key, words in expected:
        assert any(f"recipe.yml:{line}," in w and key in w and words in w for w in ignored), (line, key, ignored)


@pytest.mark.parametrize("name", sorted(n for n in RECIPES if RECIPES[n][2]))
def test_strict_makes_the_first_ignored_key_an_error(name, llama, tmp_path):
    published, _, expected = RECIPES[name]
    cfg = load_config(textwrap.dedent(published.format(**{k: str(v) for k, v in llama.items()})), source="recipe.yml")
    with pytest.raises(ConfigError) as info:
        run_merge(cfg, tmp_path / "out", quiet=True, strict=True)
    line, key, _ = expected[0]
    assert info.value.line == line and key in str(info.value) and "strict" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_exponent_floats_are_numbers_everywhere():
    cfg = load_config(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 5e-1}\nparameters: {eps: 1E-8}\n"
    )
    assert cfg.models[0].parameters["weight"] == 0.5 and cfg.parameters["eps"] == 1e-8
    # quoted, a string stays a string; the YAML 1.1 forms keep their meaning
    cfg = load_config(
        "merge_method: linear\nmodels: [{model: a}]\nparameters: {a: '1e-5', b: 1_000, c: 1.5e3, d: .5e1}\n"
    )
    assert cfg.parameters == {"a": "1e-5", "b": 1000, "c": 1500.0, "d": 5.0}


def test_several_documents_say_so():
    text = "merge_method: linear\nmodels: [{model: a}]\n---\nname: stage2\nmerge_method: ties\nmodels: [{model: b}]\n"
    with pytest.raises(ConfigError) as info:
        load_config(text, source="recipe.yml")
    msg = str(info.value)
    assert info.value.line == 3 and "2 YAML documents" in msg and "multi-stage" in msg
    assert "syntax error" not in msg


@pytest.mark.parametrize(
    "text, names",
    [
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n", []),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: bfloat16\n",
            ["float32 arithmetic"],
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\n",
            ["ties at the sparsification threshold"],
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: mlp, value: [0, 1]}, {value: 1}]}}]\n",
            ["the head's gradient value"],
        ),
        (
            "merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5, nuslerp_flatten: false}\n",
            ["nuslerp_row_wise"],
        ),
        (
            "merge_method: dare_ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\n",
            ["DARE/DELLA rescaling", "random draws"],
        ),
        (
            "merge_method: della\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\nparameters: {rescale_l1: true}\n",
            ["random draws"],
        ),
    ],
)
def test_the_differences_a_config_touches(text, names):
    from mergekitty.differences import touched_differences

    assert [d.name for d in touched_differences(load_config(text))] == names


def test_cli_notes_the_differences_in_one_line(llama, tmp_path):
    from helpers import run_cli

    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters: {{weight: [0.2, 0.8]}}\ndtype: bfloat16\n"
    )
    proc = run_cli("mergekitty-yaml", cfg, tmp_path / "out")
    notes = [line for line in proc.stderr.splitlines() if "documented difference" in line]
    assert len(notes) == 1 and "float32 arithmetic" in notes[0] and "the head's gradient value" in notes[0]
    proc = run_cli("mergekitty-yaml", cfg, tmp_path / "out", "-v")
    assert "mergekit 0.1.5 evaluates it at its first value" in proc.stderr


def test_quoted_numbers_are_read_as_the_other_tools_read_them(llama, tmp_path, caplog):
    quoted = f"""\
        merge_method: ties
        base_model: {llama["base"]}
        models:
          - model: {llama["ft1"]}
            parameters: {{weight: "0.6", density: "5e-1"}}
          - model: {llama["ft2"]}
            parameters: {{weight: 0.4, density: 0.5}}
        parameters: {{normalize: "true"}}
        """
    got, _ = _merge(quoted, tmp_path / "quoted", caplog)
    plain = quoted.replace('"0.6"', "0.6").replace('"5e-1"', "0.5").replace('"true"', "true")
    want, _ = _merge(plain, tmp_path / "plain", caplog)
    _same(got, want)


def test_a_string_that_is_no_number_names_its_key_and_line(llama):
    from mergekitty import plan_merge

    text = f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters:\n      weight: heavy\n"
    with pytest.raises(ConfigError) as info:
        plan_merge(load_config(text, source="recipe.yml"))
    assert info.value.key == "models[0].parameters.weight" and info.value.line == 5
    assert "must be a number, got the string 'heavy'" in str(info.value) and "\n" not in str(info.value)


def test_keys_inside_model_references_and_token_entries_are_ignored_loudly():
    text = (
        "merge_method: linear\nmodels:\n  - model: {model: {path: org/m, revison: r}}\n  - model: b\n"
        "tokenizer:\n  source: union\n  tokens:\n    <x>:\n      source: {kind: zero}\n      forse: true\n"
    )
    cfg = load_config(text, source="r.yml")
    assert [(p.key, p.line) for p in cfg.ignored_keys] == [
        ("models[0].model.model.revison", 3),
        ("tokenizer.tokens.<x>.forse", 10),
    ]
    assert "did you mean 'revision'?" in str(cfg.ignored_keys[0]) and "did you mean 'force'?" in str(
        cfg.ignored_keys[1]
    )
    assert str(cfg.models[0].model) == "org/m" and cfg.tokenizer.tokens["<x>"].force is False


def test_a_tokenizer_source_keyword_typo_gets_a_did_you_mean(llama, tmp_path, monkeypatch):
    from mergekitty import plan_merge

    monkeypatch.chdir(tmp_path)  # no directory named 'unoin' here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters: {{weight: 1}}\ntokenizer_source: unoin\n"
    with pytest.raises(ConfigError) as info:
        plan_merge(load_config(text, source="r.yml"))
    assert info.value.key == "tokenizer_source" and info.value.line == 5
    assert str(info.value).endswith("did you mean 'union'?")


def test_a_chat_template_whose_tokens_the_vocabulary_lacks_is_warned_about(llama, caplog):
    from mergekitty import plan_merge

    base = f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters: {{weight: 1}}\n"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_merge(load_config(base + "chat_template: chatml\n", source="r.yml"))
    (warning,) = [r.getMessage() for r in caplog.records if "chat template writes" in r.getMessage()]
    assert warning.startswith("r.yml:5, key 'chat_template'") and "'<|im_end|>', '<|im_start|>'" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_merge(load_config(base + "chat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\n"))
    assert not [r for r in caplog.records if "chat template writes" in r.getMessage()]
