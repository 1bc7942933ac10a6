"""Every layer_range error is a ConfigError naming the config file, its line and its key, as every
other config error: a range out of order, of the wrong form, beyond a model's layers, beyond the
layers of a base model that supplies them, and models of different depths in a models list."""

from __future__ import annotations

import pytest

from mergekitty import ConfigError, plan_merge


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A llama of the tiny family's shape with 2 layers (the family has 4)."""
    from mergekitty.tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("short") / "short", "llama", num_hidden_layers=2)


def _error(text: str, path) -> ConfigError:
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        plan_merge(str(path))
    return err.value


def _slices(model, layer_range: str, extra: str = "") -> str:
    return f"slices:\n  - sources:\n      - model: {model}\n        layer_range: {layer_range}\nmerge_method: passthrough\n{extra}"


@pytest.mark.parametrize(
    "layer_range,says",
    [
        ("[3, 2]", "layer_range [3, 2] must satisfy 0 <= start < stop"),
        ("[-1, 2]", "layer_range [-1, 2] must satisfy 0 <= start < stop"),
        ("[2, 2]", "layer_range [2, 2] must satisfy 0 <= start < stop"),
        ("[0, 4, 5]", "layer_range must be two integers [start, stop], got 3 value(s)"),
        ("7", "layer_range must be two integers [start, stop], got 7"),
        # the stop is excluded: [0, 9] reads layers 0 to 8, of a model of 4
        ("[0, 9]", "layer_range [0, 9] (layers 0-8) is beyond the 4 layers of {model}"),
        ("[4, 5]", "layer_range [4, 5] (layer 4) is beyond the 4 layers of {model}"),
    ],
)
def test_a_bad_range_names_its_line_and_key(llama, tmp_path, layer_range, says):
    err = _error(_slices(llama["ft1"], layer_range), tmp_path / "c.yml")
    assert (err.line, err.key) == (4, "slices[0].sources[0].layer_range")
    prefix = f"{tmp_path / 'c.yml'}:4, key 'slices[0].sources[0].layer_range': "
    assert str(err).startswith(prefix + says.format(model=llama["ft1"]))


def test_a_range_beyond_the_base_that_supplies_it(llama, short, tmp_path):
    """TIES over layers 2-3 of two 4-layer models, onto a 2-layer base: the base has no layer 2."""
    text = (
        f"slices:\n  - sources:\n      - model: {llama['ft1']}\n        layer_range: [2, 4]\n"
        f"      - model: {llama['ft2']}\n        layer_range: [2, 4]\n"
        f"    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\nbase_model: {short}\n"
    )
    err = _error(text, tmp_path / "c.yml")
    assert (err.line, err.key) == (4, "slices[0].sources[0].layer_range")
    assert "layer_range [2, 4] (layers 2-3) is beyond the 2 layers of the base model" in str(err)
    assert str(short) in str(err)


def test_models_of_different_depths_in_a_models_list(llama, short, tmp_path):
    listed = (
        f"models:\n  - model: {llama['ft1']}\n  - model: {short}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n"
    )
    err = _error(listed, tmp_path / "listed.yml")
    assert (err.line, err.key) == (3, "models[1].model")
    assert f"{short} has 2 layers but {llama['ft1']} has 4" in str(err)
    base = (
        f"models:\n  - model: {llama['ft1']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"base_model: {short}\nmerge_method: ties\n"
    )
    err = _error(base, tmp_path / "base.yml")
    assert (err.line, err.key) == (4, "base_model")
    assert f"{short} has 2 layers but {llama['ft1']} has 4" in str(err)


def test_the_cli_prints_it_as_one_line(llama, tmp_path, capsys):
    from mergekitty.cli.yaml_cmd import main

    cfg = tmp_path / "c.yml"
    cfg.write_text(_slices(llama["ft1"], "[0, 9]"))
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg), str(tmp_path / "out"), "-q"], standalone_mode=False)
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {cfg}:4, key 'slices[0].sources[0].layer_range': layer_range [0, 9]")
    assert not (tmp_path / "out").exists()
