"""Layer shuffle: the drawn config (reproducible from its seed, maximal slices, weights and counts
respected), the command's output (each layer a copy of the layer the YAML names), and bad input
as one line."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mergekitty.errors import InvalidArgumentError
from mergekitty.layershuffle import MAX_DRAWN_LAYERS, shuffle_config, shuffle_yaml

MODELS = ["m/a", "m/b", "m/c"]


def _picks(config: dict) -> list[tuple[str, int]]:
    """The output layers of a config as (model, source layer), slice by slice."""
    out = []
    for sl in config["slices"]:
        (src,) = sl["sources"]
        start, stop = src["layer_range"]
        assert 0 <= start < stop
        out += [(src["model"], layer) for layer in range(start, stop)]
    return out


def _assert_maximal(config: dict) -> None:
    """No slice could be joined to the next: the next one is another model, or does not go on
    from the layer where this one stops."""
    sources = [sl["sources"][0] for sl in config["slices"]]
    for prev, nxt in zip(sources, sources[1:]):
        assert not (prev["model"] == nxt["model"] and prev["layer_range"][1] == nxt["layer_range"][0]), (prev, nxt)


# ------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("full_random", [False, True])
def test_same_seed_same_yaml_and_other_seeds_differ(full_random):
    def text(seed: int) -> str:
        return shuffle_yaml(shuffle_config(MODELS, [32, 32, 32], [1, 1, 1], seed, full_random), seed, full_random)

    assert text(7) == text(7)
    assert "seed 7" in text(7).splitlines()[0] and text(7).startswith("#")
    # 3 models x 32 layers: two seeds drawing the same config would be a ~3**-32 coincidence
    assert len({text(seed).split("\n", 1)[1] for seed in range(10)}) == 10


@pytest.mark.parametrize("full_random", [False, True])
def test_every_slice_is_maximal(full_random):
    joined = 0
    for seed in range(50):
        config = shuffle_config(["m/a", "m/b"], [16, 16], [1, 4], seed, full_random)
        _assert_maximal(config)
        joined += sum(
            sl["sources"][0]["layer_range"][1] - sl["sources"][0]["layer_range"][0] > 1 for sl in config["slices"]
        )
    assert joined > 0  # runs longer than one layer do occur, and were joined


def test_a_single_model_by_position_is_one_slice():
    config = shuffle_config(["m/a"], [12], [], 3)
    assert config["slices"] == [{"sources": [{"model": "m/a", "layer_range": [0, 12]}]}]
    assert config["merge_method"] == "passthrough" and "dtype" not in config


def test_by_position_layer_i_comes_from_some_models_layer_i():
    config = shuffle_config(MODELS, [24, 24, 24], [1, 2, 3], 11)
    picks = _picks(config)
    assert [layer for _, layer in picks] == list(range(24))  # as deep as the first model
    assert {model for model, _ in picks} <= set(MODELS)


def test_by_position_takes_layers_only_from_models_that_have_them():
    # the second model has 4 layers: layers 4.. of the output can only come from the first
    for seed in range(20):
        picks = _picks(shuffle_config(["m/a", "m/b"], [10, 4], [1, 100], seed))
        assert all(model == "m/a" for model, layer in picks if layer >= 4)
        assert len(picks) == 10


def test_full_random_draws_int_layers_times_weight_from_each_model():
    counts, weights = [8, 12, 5], [1.0, 0.5, 2.0]
    for seed in range(10):
        picks = _picks(shuffle_config(MODELS, counts, weights, seed, full_random=True))
        per_model = Counter(model for model, _ in picks)
        assert per_model == {m: int(c * w) for m, c, w in zip(MODELS, counts, weights)}  # 8, 6, 10
        for model, layer in picks:
            assert 0 <= layer < counts[MODELS.index(model)]


def test_full_random_shuffles_the_order():
    # 20 picks of each model: all of one model first would be a 1 in C(40, 20) chance
    picks = _picks(shuffle_config(["m/a", "m/b"], [20, 20], [1, 1], 5, full_random=True))
    first_half = {model for model, _ in picks[:20]}
    assert first_half == {"m/a", "m/b"}


@pytest.mark.parametrize("full_random", [False, True])
def test_weight_zero_is_never_picked(full_random):
    for seed in range(30):
        picks = _picks(shuffle_config(MODELS, [16, 16, 16], [1, 0, 2], seed, full_random))
        assert "m/b" not in {model for model, _ in picks}


def test_weights_set_the_share_of_layers_by_position():
    # 4000 layers, weights 1 : 3: model b's share is 0.75 (binomial sd 0.007; 0.03 is over 4 sd)
    picks = _picks(shuffle_config(["m/a", "m/b"], [4000, 4000], [1, 3], 123))
    share = sum(model == "m/b" for model, _ in picks) / len(picks)
    assert abs(share - 0.75) < 0.03, share


def test_fp16_sets_the_dtype_and_the_yaml_loads_as_a_config():
    from mergekitty.config import load_config

    config = shuffle_config(MODELS, [6, 6, 6], [1, 1, 1], 2, dtype="float16")
    loaded = load_config(shuffle_yaml(config, 2))
    assert loaded.dtype == "float16" and loaded.merge_method == "passthrough"
    assert [(str(s.sources[0].model), list(s.sources[0].layer_range)) for s in loaded.slices] == [
        (sl["sources"][0]["model"], sl["sources"][0]["layer_range"]) for sl in config["slices"]
    ]


@pytest.mark.parametrize(
    ("models", "counts", "weights", "full_random", "message"),
    [
        ([], [], [], False, "no models"),
        (["m/a", "m/b"], [4, 4], [1.0], False, "1 -w/--weight value(s) for 2 -m/--model model(s)"),
        (["m/a", "m/b"], [4, 4], [1.0, -0.5], False, "-w/--weight -0.5 of model m/b"),
        (["m/a"], [4], [math.nan], False, "a weight must be a number >= 0"),
        (["m/a"], [4], [math.inf], False, "a weight must be a number >= 0"),
        (["m/a", "m/b"], [4, 4], [0, 0], False, "every -w/--weight is 0"),
        (["m/a", "m/b"], [4, 4], [0.1, 0.2], True, "draws no layer"),
        (["m/a"], [4], [MAX_DRAWN_LAYERS], True, "lower the weights"),
        (["m/a", "m/b"], [10, 4], [0, 1], False, "layer 4: no model with a positive weight"),
    ],
)
def test_bad_input_is_a_clear_error(models, counts, weights, full_random, message):
    with pytest.raises(InvalidArgumentError) as exc:
        shuffle_config(models, counts, weights, 0, full_random)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory):
    """Three related 8-layer models: enough layers for runs and jumps between models."""
    from mergekitty.tiny_models import make_family

    base, ft1, ft2 = make_family(tmp_path_factory.mktemp("shuffle"), "llama", 2, num_hidden_layers=8)
    return [base, ft1, ft2]


def _run(args: list, capsys) -> tuple[int, str, str]:
    """``mergekitty layershuffle ARGS`` in this process: (exit code, stdout, stderr)."""
    from mergekitty.cli.main import group

    capsys.readouterr()
    code = 0
    try:
        group(["layershuffle", *map(str, args)], standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_print_yaml_is_reproducible_and_a_drawn_seed_is_reported(deep_family, tmp_path, capsys):
    models = [a for m in deep_family for a in ("-m", m)]
    args = [tmp_path / "out", *models, "--print-yaml", "--dry-run"]
    code, first, err = _run([*args, "--random-seed", "42"], capsys)
    assert code == 0, err
    assert _run([*args, "--random-seed", "42"], capsys)[1] == first
    assert _run([*args, "--random-seed", "43"], capsys)[1] != first
    config = yaml.safe_load(first)  # stdout holds the YAML alone (the dry run's plan is on stderr)
    assert len(_picks(config)) == 8 and "layer map" in err
    _assert_maximal(config)
    assert not (tmp_path / "out").exists()

    code, drawn, err = _run(args, capsys)
    seed = int(err.split("random seed: ")[1].split()[0])
    assert f"random seed {seed}" in drawn.splitlines()[0]
    assert _run([*args, "--random-seed", seed], capsys)[1] == drawn


def _expected_state(config: dict, models: dict[str, dict], out_layers: int) -> dict:
    """The merged model a passthrough of ``config`` must be: output layer k is a copy of the layer
    the YAML names for it, the embeddings come from the first slice's model, the final norm and
    head from the last slice's."""
    picks = _picks(config)
    assert len(picks) == out_layers
    first, last = picks[0][0], picks[-1][0]
    expected = {
        "model.embed_tokens.weight": models[first]["model.embed_tokens.weight"],
        "model.norm.weight": models[last]["model.norm.weight"],
        "lm_head.weight": models[last]["lm_head.weight"],
    }
    for k, (model, layer) in enumerate(picks):
        prefix = f"model.layers.{layer}."
        for name, tensor in models[model].items():
            if name.startswith(prefix):
                expected[f"model.layers.{k}.{name[len(prefix) :]}"] = tensor
    return expected


@pytest.mark.parametrize("full_random", [False, True])
def test_merged_layers_are_copies_of_the_layers_the_yaml_names(deep_family, tmp_path, capsys, full_random):
    import json

    import torch

    from helpers import read_state

    out, written = tmp_path / "out", tmp_path / "shuffle.yml"
    weights = ["1", "1", "0.5"] if full_random else ["1", "2", "1"]
    args = [out, *[a for m in deep_family for a in ("-m", m)], *[a for w in weights for a in ("-w", w)]]
    args += ["--random-seed", "9", "--write-yaml", written, "-q"]
    args += ["--full-random", "--fp16"] if full_random else []
    code, _, err = _run(args, capsys)
    assert code == 0, err
    config = yaml.safe_load(written.read_text())
    _assert_maximal(config)
    models = {str(m): read_state(m) for m in deep_family}
    out_layers = 8 + 8 + 4 if full_random else 8
    expected = _expected_state(config, models, out_layers)
    merged = read_state(out)
    assert set(merged) == set(expected)
    dtype = torch.float16 if full_random else torch.float32
    for name, tensor in expected.items():
        assert merged[name].dtype == dtype, name
        assert torch.equal(merged[name], tensor.to(dtype)), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == out_layers
    # the model card's config is the YAML, seed comment included
    assert (out / "mergekitty_config.yml").read_text().startswith(written.read_text())


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-m", "{missing}"], "model directory not found"),
        (["-m", "{a}", "-m", "{b}", "-w", "1"], "1 -w/--weight value(s) for 2 -m/--model model(s)"),
        (["-m", "{a}", "-m", "{b}", "-w", "1", "-w", "-2"], "-w/--weight -2.0 of model"),
        ([], "no models"),
    ],
)
def test_bad_command_lines_are_one_line(deep_family, tmp_path, capsys, extra, needle):
    paths = {"missing": tmp_path / "nowhere" / "model", "a": deep_family[0], "b": deep_family[1]}
    code, out, err = _run([tmp_path / "out", *[e.format(**paths) for e in extra], "--dry-run"], capsys)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("error:") and needle in line, err
    assert out == "" and not (tmp_path / "out").exists()


def test_write_yaml_is_the_config_that_is_merged(deep_family, tmp_path, capsys):
    written = tmp_path / "shuffle.yml"
    args = [tmp_path / "out", "-m", deep_family[0], "-m", deep_family[1], "--random-seed", "3", "--dry-run"]
    code, out, err = _run([*args, "--write-yaml", written], capsys)
    assert code == 0, err
    config = yaml.safe_load(Path(written).read_text())
    # the dry run's plan (stdout, no --print-yaml) maps each output layer to the YAML's pick
    for k, (model, layer) in enumerate(_picks(config)):
        assert f"{k} │ {model}: {layer} " in out, out


def test_write_yaml_inside_a_model_is_refused(deep_family, tmp_path, capsys):
    config = Path(deep_family[0]) / "config.json"
    before = config.read_bytes()
    args = [tmp_path / "out", "-m", deep_family[0], "-m", deep_family[1], "--random-seed", "3", "--dry-run"]
    code, _, err = _run([*args, "--write-yaml", config], capsys)
    assert code != 0 and "--write-yaml" in err and "Traceback" not in err
    assert config.read_bytes() == before
