"""Raw merges (``mergekitty pytorch``): plain state-dict files, with no config.json, merged tensor
by tensor by name through the one planner, executor and output transaction.

Golden values are plain torch (float64) over the state dicts the fixtures write."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekitty.errors import ConfigError, ModelFormatError, ModelNotFoundError, PlanError
from mergekitty.kernels import Torch
from mergekitty.plan import MergePlan
from mergekitty.raw_merge import RAW_MARKER, plan_raw_merge, run_raw_merge

# names a Hugging Face model would give other meanings (a layer stack, a head tied to the
# embedding): a raw merge takes each as a tensor of its own
SHAPES = {
    "embed_tokens.weight": (6, 4),
    "layers.0.attn.q.weight": (4, 4),
    "layers.0.mlp.up.weight": (8, 4),
    "layers.1.attn.q.weight": (4, 4),
    "norm.weight": (4,),
}


def _state(seed: int, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}
    state.update(extra or {})
    return state


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A base and three fine-tunes as single files: safetensors, and one torch .bin."""
    root = tmp_path_factory.mktemp("raw")
    base = _state(0)
    states = {"base": base}
    for i, name in enumerate(("ft1", "ft2", "ft3"), start=1):
        g = torch.Generator().manual_seed(100 + i)
        states[name] = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {}
    for name in ("base", "ft1", "ft2"):
        paths[name] = root / f"{name}.safetensors"
        save_file(states[name], str(paths[name]))
    paths["ft3"] = root / "ft3.bin"
    torch.save(states["ft3"], paths["ft3"])
    return {"paths": paths, "states": states, "root": root}


def _config(method: str, models: list[tuple[object, dict]], base=None, extra: str = "") -> str:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for path, params in models:
        lines.append(f"  - model: {path}")
        if params:
            lines.append(f"    parameters: {json.dumps(params)}")
    return "\n".join(lines) + "\n" + extra


def _native(plan: MergePlan) -> None:
    """Every job of ``plan`` runs a native kernel, as in a merge of models."""
    assert not [j.out_name for j in plan.jobs if isinstance(j.kernel, Torch)]


def _close(out: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() <= tol * (1 + expected.abs().max().item())


# ------------------------------------------------------------------------------------ the methods


@pytest.mark.parametrize("models", [("ft1", "ft2"), ("ft1", "ft2", "ft3")], ids=["safetensors", "with-bin"])
def test_linear_is_the_weighted_mean(raw, tmp_path, models):
    weights = {"ft1": 0.2, "ft2": 0.5, "ft3": 0.3}
    cfg = _config("linear", [(raw["paths"][m], {"weight": weights[m]}) for m in models])
    if "ft3" not in models:
        _native(plan_raw_merge(cfg))
    run_raw_merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(SHAPES)
    total = sum(weights[m] for m in models)
    for name in SHAPES:
        expected = sum(weights[m] * raw["states"][m][name].double() for m in models) / total
        _close(out[name], expected)
        assert out[name].dtype == torch.float32


def _ties(base, xs, weights, densities):
    """TIES in float64: keep each task vector's top-k magnitudes (k = floor(density * n)), elect
    the sign of the weighted sum, and average the weighted deltas that agree with it (divided by
    the sum of their weights)."""
    terms = []
    for x, w, density in zip(xs, weights, densities):
        d = (x - base).double()
        k = max(1, math.floor(density * d.numel()))
        threshold = d.abs().reshape(-1).topk(k).values.min()
        terms.append(w * torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    positive = sum(terms) >= 0
    agree = [torch.where(positive, t > 0, t < 0) for t in terms]
    merged = sum(torch.where(a, t, torch.zeros_like(t)) for a, t in zip(agree, terms))
    divisor = sum(a.double() * w for a, w in zip(agree, weights))
    return base.double() + torch.where(divisor != 0, merged / divisor, merged)


def test_ties_onto_the_base(raw, tmp_path):
    p, s = raw["paths"], raw["states"]
    params = {"ft1": {"weight": 1.0, "density": 0.5}, "ft2": {"weight": 0.6, "density": 0.7}}
    cfg = _config("ties", [(p[m], params[m]) for m in params], base=p["base"])
    _native(plan_raw_merge(cfg))
    run_raw_merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(SHAPES)
    weights, densities = [params[m]["weight"] for m in params], [params[m]["density"] for m in params]
    for name in SHAPES:
        _close(out[name], _ties(s["base"][name], [s[m][name] for m in params], weights, densities))


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    cos = (a @ b) / (a.norm() * b.norm())
    theta = torch.arccos(cos)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.reshape(v0.shape)


def test_slerp_with_a_name_filter(raw, tmp_path):
    """A filter picks t by tensor name (a substring), the entry without one takes the rest."""
    p, s = raw["paths"], raw["states"]
    cfg = _config(
        "slerp",
        [(p["base"], {}), (p["ft1"], {})],
        base=p["base"],
        extra="parameters:\n  t:\n    - filter: attn\n      value: 0.8\n    - value: 0.3\n",
    )
    _native(plan_raw_merge(cfg))
    run_raw_merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in SHAPES:
        t = 0.8 if "attn" in name else 0.3
        _close(out[name], _slerp(t, s["base"][name], s["ft1"][name]))


def test_a_per_model_filter_and_a_gradient(raw, tmp_path, caplog):
    """Per-model filters see the tensor name; a gradient takes its first value (t = 0), with a warning."""
    p, s = raw["paths"], raw["states"]
    ft1 = {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}
    cfg = _config("linear", [(p["ft1"], ft1), (p["ft2"], {"weight": [1.0, 5.0]})])
    with caplog.at_level("WARNING"):
        run_raw_merge(cfg, tmp_path / "out", quiet=True)
    assert "a gradient in a raw merge takes its first value, 1.0" in caplog.text
    assert "models[1].parameters.weight" in caplog.text
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in SHAPES:
        w1 = 3.0 if "mlp" in name else 1.0
        expected = (w1 * s["ft1"][name].double() + 1.0 * s["ft2"][name].double()) / (w1 + 1.0)
        _close(out[name], expected)


@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_bf16_inputs(tmp_path, out_dtype):
    a, b = _state(1, torch.bfloat16), _state(2, torch.bfloat16)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    extra = f"out_dtype: {out_dtype}\n" if out_dtype else ""
    cfg = _config(
        "linear",
        [(tmp_path / "a.safetensors", {"weight": 0.25}), (tmp_path / "b.safetensors", {"weight": 0.75})],
        extra=extra,
    )
    _native(plan_raw_merge(cfg))
    run_raw_merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = torch.float32 if out_dtype else torch.bfloat16
    for name in SHAPES:
        expected = 0.25 * a[name].double() + 0.75 * b[name].double()
        assert out[name].dtype == want
        # float32 arithmetic, then one rounding to the output dtype
        _close(out[name], expected, tol=2**-8 if want == torch.bfloat16 else 1e-6)


# ------------------------------------------------------------------------------------ missing tensors


@pytest.fixture(scope="module")
def uneven(raw, tmp_path_factory):
    """ft1 with an extra tensor; ft2 without norm.weight and with an extra tensor of its own."""
    root = tmp_path_factory.mktemp("uneven")
    s = raw["states"]
    only1 = torch.randn(3, generator=torch.Generator().manual_seed(5))
    only2 = torch.randn(2, 2, generator=torch.Generator().manual_seed(6))
    one = {**s["ft1"], "only_in_one.bias": only1}
    two = {k: v for k, v in s["ft2"].items() if k != "norm.weight"} | {"only_in_two.weight": only2}
    save_file(one, str(root / "one.safetensors"))
    save_file(two, str(root / "two.safetensors"))
    return {"one": root / "one.safetensors", "two": root / "two.safetensors", "states": (one, two)}


def _uneven_config(uneven) -> str:
    return _config("linear", [(uneven["one"], {"weight": 1.0}), (uneven["two"], {"weight": 3.0})])


def test_a_missing_tensor_is_an_error_by_default(uneven):
    with pytest.raises(PlanError) as err:
        plan_raw_merge(_uneven_config(uneven))
    message = str(err.value)
    assert "'norm.weight' is missing from " + str(uneven["two"]) in message
    assert "--tensor-intersection" in message and "--tensor-union" in message and "\n" not in message


def test_intersection_keeps_the_tensors_every_model_has(uneven, tmp_path):
    plan = run_raw_merge(_uneven_config(uneven), tmp_path / "out", missing="intersection", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    one, two = uneven["states"]
    assert set(out) == set(SHAPES) - {"norm.weight"}
    for name in out:
        _close(out[name], (one[name].double() + 3.0 * two[name].double()) / 4.0)
    left_out = {(plan.models[e.model].label, t) for e in plan.excluded for t in e.tensors}
    assert left_out == {
        (str(uneven["one"]), "norm.weight"),
        (str(uneven["one"]), "only_in_one.bias"),
        (str(uneven["two"]), "only_in_two.weight"),
    }


def test_union_merges_each_tensor_from_the_models_that_have_it(uneven, tmp_path):
    run_raw_merge(_uneven_config(uneven), tmp_path / "out", missing="union", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    one, two = uneven["states"]
    assert set(out) == set(one) | set(two)
    for name in SHAPES:
        if name == "norm.weight":
            _close(out[name], one[name].double())  # only in one: its weight is normalized to 1
        else:
            _close(out[name], (one[name].double() + 3.0 * two[name].double()) / 4.0)
    assert torch.equal(out["only_in_one.bias"], one["only_in_one.bias"])
    assert torch.equal(out["only_in_two.weight"], two["only_in_two.weight"])


def test_union_without_the_base_a_method_needs(raw, uneven):
    cfg = _config("ties", [(uneven["one"], {"weight": 1.0})], base=uneven["two"])
    with pytest.raises(PlanError, match=r"'norm.weight' is missing from the base model .*two.safetensors"):
        plan_raw_merge(cfg, missing="union")


# ------------------------------------------------------------------------------------ inputs and output


def test_a_directory_of_shards_and_a_sharded_output(raw, tmp_path):
    """A directory of loose safetensors shards (no config.json) is one model; a small shard size
    gives several output shards and an index that loads."""
    shards = tmp_path / "sharded"
    shards.mkdir()
    names = list(SHAPES)
    s = raw["states"]["ft2"]
    save_file({k: s[k] for k in names[:2]}, str(shards / "part-1.safetensors"))
    save_file({k: s[k] for k in names[2:]}, str(shards / "part-2.safetensors"))
    cfg = _config("linear", [(raw["paths"]["ft1"], {"weight": 1.0}), (shards, {"weight": 1.0})])
    run_raw_merge(cfg, tmp_path / "out", out_shard_size=200, quiet=True)
    out_dir = tmp_path / "out"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)
    assert len(set(index["weight_map"].values())) > 1
    out = {}
    for f in set(index["weight_map"].values()):
        out.update(load_file(str(out_dir / f)))
    for name in SHAPES:
        _close(out[name], (raw["states"]["ft1"][name].double() + s[name].double()) / 2)
    # no tokenizer, config.json or card: the weights, and the config written last
    assert not (out_dir / "config.json").exists() and not (out_dir / "README.md").exists()
    assert (out_dir / RAW_MARKER).read_text().startswith("merge_method: linear")


def test_the_plan_reads_back_from_json(raw):
    cfg = _config("linear", [(raw["paths"]["ft1"], {"weight": 1.0}), (raw["paths"]["ft3"], {"weight": 1.0})])
    plan = plan_raw_merge(cfg)
    again = MergePlan.from_json(plan.to_json())
    assert again.models == plan.models and again.jobs == plan.jobs
    assert again.models[0].files == ("ft1.safetensors",)


def test_tokenizer_keys_are_ignored_with_a_warning_and_strict_refuses_them(raw, caplog):
    cfg = _config("linear", [(raw["paths"]["ft1"], {"weight": 1.0})], extra="tokenizer_source: union\n")
    with caplog.at_level("WARNING"):
        plan_raw_merge(cfg)
    assert "key 'tokenizer_source'" in caplog.text and "writes no tokenizer" in caplog.text
    with pytest.raises(ConfigError, match="tokenizer_source"):
        plan_raw_merge(cfg, strict=True)


def test_a_missing_file_names_the_file_and_the_key(raw, tmp_path):
    missing = tmp_path / "nope.safetensors"
    cfg = _config("linear", [(raw["paths"]["ft1"], {"weight": 1.0}), (missing, {"weight": 1.0})])
    with pytest.raises(ModelNotFoundError) as err:
        plan_raw_merge(cfg)
    message = str(err.value)
    assert "key 'models[1].model'" in message and str(missing) in message and "\n" not in message


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("junk.safetensors", b"this is not a safetensors file at all", "junk.safetensors"),
        ("list.bin", "list", "expected a dict of tensors"),
        ("empty.pt", "empty", "holds no tensors"),
    ],
)
def test_a_file_that_is_not_a_state_dict(raw, tmp_path, name, content, expected):
    path = tmp_path / name
    if content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "empty":
        torch.save({"step": 3}, path)
    else:
        path.write_bytes(content)
    cfg = _config("linear", [(raw["paths"]["ft1"], {"weight": 1.0}), (path, {"weight": 1.0})])
    with pytest.raises(ModelFormatError) as err:
        plan_raw_merge(cfg)
    message = str(err.value)
    assert "key 'models[1].model'" in message and expected in message and "\n" not in message


def test_slices_are_refused_at_their_key(raw):
    cfg = (
        "merge_method: linear\nslices:\n  - sources:\n"
        f"      - model: {raw['paths']['ft1']}\n        layer_range: [0, 1]\n"
    )
    with pytest.raises(ConfigError) as err:
        plan_raw_merge(cfg)
    message = str(err.value)
    assert "'slices' is not part of a raw merge" in message and ":2" in message and "\n" not in message


# ------------------------------------------------------------------------------------ the command


def test_command_errors_are_one_line(raw, tmp_path, capsys):
    from mergekitty.cli.pytorch import main

    cfg = tmp_path / "raw.yml"
    cfg.write_text(_config("linear", [(raw["paths"]["ft1"], {"weight": 1.0}), (tmp_path / "gone.bin", {})]))
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg), str(tmp_path / "out"), "-q"], standalone_mode=False)
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and "gone.bin" in line and "models[1].model" in line
    assert not (tmp_path / "out").exists()


def test_command_takes_one_policy(raw, tmp_path):
    import click

    from mergekitty.cli.pytorch import main

    with pytest.raises(click.UsageError, match="at most one"):
        main(["c.yml", str(tmp_path / "out"), "-i", "-u"], standalone_mode=False)


@pytest.mark.slow
def test_the_commands_merge_with_each_policy(uneven, tmp_path):
    """``mergekitty pytorch`` and ``mergekitty-pytorch`` (as a module: the console script's target)."""
    cfg = tmp_path / "raw.yml"
    cfg.write_text(_uneven_config(uneven))
    group = [sys.executable, "-m", "mergekitty.cli.main", "pytorch"]
    script = [sys.executable, "-m", "mergekitty.cli.pytorch"]
    failed = subprocess.run([*group, str(cfg), str(tmp_path / "a")], capture_output=True, text=True)
    assert failed.returncode == 1 and "'norm.weight' is missing" in failed.stderr
    for command, flag, out in ((group, "-i", "i"), (script, "--tensor-union", "u")):
        done = subprocess.run([*command, str(cfg), str(tmp_path / out), flag, "-q"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    one, two = uneven["states"]
    assert set(load_file(str(tmp_path / "i" / "model.safetensors"))) == set(SHAPES) - {"norm.weight"}
    assert set(load_file(str(tmp_path / "u" / "model.safetensors"))) == set(one) | set(two)


@pytest.mark.slow
def test_without_torch_safetensors_merge_and_a_bin_input_says_what_it_needs(raw, tmp_path):
    """Without torch a raw merge of safetensors files runs on the native kernels and writes the
    bytes it writes with torch; a .bin input stops with one line (exit status 2)."""
    from helpers import without_torch_env

    (tmp_path / "no-torch").mkdir()
    env = without_torch_env(tmp_path / "no-torch")
    p = raw["paths"]
    cfg = tmp_path / "raw.yml"
    cfg.write_text(
        _config("ties", [(p["ft1"], {"weight": 1.0, "density": 0.5}), (p["ft2"], {"weight": 1.0})], p["base"])
    )
    run_raw_merge(cfg, tmp_path / "with", quiet=True)
    command = [sys.executable, "-m", "mergekitty.cli.pytorch"]
    done = subprocess.run(
        [*command, str(cfg), str(tmp_path / "without"), "-q"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    with_torch = (tmp_path / "with" / "model.safetensors").read_bytes()
    assert (tmp_path / "without" / "model.safetensors").read_bytes() == with_torch
    cfg.write_text(_config("linear", [(p["ft1"], {"weight": 1.0}), (p["ft3"], {"weight": 1.0})]))
    failed = subprocess.run([*command, str(cfg), str(tmp_path / "bin"), "-q"], capture_output=True, text=True, env=env)
    assert failed.returncode == 2 and "needs PyTorch" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_the_output_cannot_be_the_directory_holding_an_input(raw):
    """The new output replaces its directory as a whole: an input file in it would be replaced."""
    from pathlib import Path

    from mergekitty.errors import OutputError

    first = Path(raw["paths"]["ft1"])
    before = first.read_bytes()
    cfg = _config("linear", [(raw["paths"][m], {"weight": 0.5}) for m in ("ft1", "ft2")])
    for out in (first.parent, first.parent.parent):
        with pytest.raises(OutputError, match="holds the input"):
            run_raw_merge(cfg, out, quiet=True)
    assert first.read_bytes() == before


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_pickles_of_any_suffix(raw, tmp_path, suffix):
    """.pt and .pth files are read through torch, like .bin (the plan does not take them as mapped)."""
    paths = {}
    for name in ("ft1", "ft2"):
        paths[name] = tmp_path / f"{name}{suffix}"
        torch.save(raw["states"][name], paths[name])
    cfg = _config("linear", [(paths["ft1"], {"weight": 0.25}), (paths["ft2"], {"weight": 0.75})])
    run_raw_merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in SHAPES:
        expected = (0.25 * raw["states"]["ft1"][name].double() + 0.75 * raw["states"]["ft2"][name].double()) / 1.0
        _close(out[name], expected)
