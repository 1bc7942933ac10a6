"""The health report: non-finite inputs and outputs, norms far from every parent's, --json.

Golden values come from plain torch: NaN/Inf counts from ``torch.isfinite``, norms from float64
sums of squares of the finite elements."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import read_state, run_yaml
from mergekitty import _native
from mergekitty.errors import MergeError, NonFiniteError
from mergekitty.health import HEALTH_FILE, HealthReport, buffer_figures, tensor_figures
from mergekitty.ops.reduce import bytes_view

TENSOR = "model.layers.0.mlp.up_proj.weight"


def _poisoned(src: Path, dst: Path, edit) -> Path:
    """A copy of model ``src`` whose TENSOR is changed in place by ``edit(tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state[TENSOR])
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def bad(llama, tmp_path_factory):
    """Fine-tune 1 and the base with one NaN, fine-tune 1 with one +Inf, fine-tunes 1 and 2 with
    TENSOR filled with 1.7e38 (finite in float32; the sum of two rounds past the largest bfloat16),
    fine-tune 1 in float64 with TENSOR filled with 1e308."""
    root = tmp_path_factory.mktemp("poisoned")

    def put(value, index=5):
        return lambda t: t.view(-1).__setitem__(index, value)

    def to_f64_huge(src: Path, dst: Path) -> Path:
        from safetensors.torch import load_file, save_file

        shutil.copytree(src, dst)
        state = {k: v.double() for k, v in load_file(str(src / "model.safetensors")).items()}
        state[TENSOR].fill_(1e308)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst

    return {
        "f64-huge": to_f64_huge(llama["ft1"], root / "ft1-f64"),
        "nan": _poisoned(llama["ft1"], root / "ft1-nan", put(float("nan"))),
        "inf": _poisoned(llama["ft1"], root / "ft1-inf", put(float("inf"))),
        "base-nan": _poisoned(llama["base"], root / "base-nan", put(float("nan"))),
        "big1": _poisoned(llama["ft1"], root / "ft1-big", lambda t: t.fill_(1.7e38)),
        "big2": _poisoned(llama["ft2"], root / "ft2-big", lambda t: t.fill_(1.7e38)),
    }


def _tensor(model: Path, name: str = TENSOR) -> torch.Tensor:
    return read_state(model)[name]


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _norm(t: torch.Tensor) -> float:
    d = t.double()
    return float(torch.where(torch.isfinite(d), d, 0.0).square().sum().sqrt())


# Each merge reads the poisoned model and carries its NaN into TENSOR of the output: linear
# (native weighted sum), TIES with a NaN base (native GTA: out = base + ...), slerp and model
# stock (torch: one NaN makes the whole tensor NaN), passthrough (a copy).
CARRIED = {
    "linear": ("models:\n  - model: {nan}\n    parameters: {{weight: 0.5}}\n"
               "  - model: {ft2}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n"),
    "ties": ("models:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
             "  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
             "base_model: {base_nan}\nmerge_method: ties\n"),
    "slerp": ("models:\n  - model: {nan}\n  - model: {ft2}\nbase_model: {nan}\n"
              "merge_method: slerp\nparameters: {{t: 0.5}}\n"),
    "model_stock": ("models:\n  - model: {nan}\n  - model: {ft2}\nbase_model: {base}\n"
                    "merge_method: model_stock\n"),
    "passthrough": "models:\n  - model: {nan}\nmerge_method: passthrough\n",
}  # fmt: skip


def _config(text: str, llama, bad) -> str:
    return text.format(nan=bad["nan"], base_nan=bad["base-nan"], ft1=llama["ft1"], ft2=llama["ft2"], base=llama["base"])


@pytest.mark.faults
@pytest.mark.parametrize("method", sorted(CARRIED))
def test_a_nan_that_reaches_the_output_is_refused(method, llama, bad, tmp_path):
    poisoned = bad["base-nan"] if method == "ties" else bad["nan"]
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as info:
        from mergekitty import run_merge

        run_merge(_config(CARRIED[method], llama, bad), out, quiet=True)
    e = info.value
    assert isinstance(e, MergeError)
    assert e.tensor == TENSOR and e.models == (str(poisoned),)
    message = str(e)
    assert f"tensor '{TENSOR}'" in message and str(poisoned) in message and "--allow-nonfinite" in message
    # the transaction aborted: nothing that looks like a model
    left = {p.name for p in out.iterdir()} if out.exists() else set()
    assert "config.json" not in left and not any(n.endswith(".safetensors") for n in left), left


@pytest.mark.faults
@pytest.mark.parametrize("method", sorted(CARRIED))
def test_allow_nonfinite_writes_and_reports_it(method, llama, bad, tmp_path):
    from mergekitty import run_merge

    poisoned = bad["base-nan"] if method == "ties" else bad["nan"]
    reports: list[HealthReport] = []
    out = tmp_path / "out"
    run_merge(_config(CARRIED[method], llama, bad), out, quiet=True, allow_nonfinite=True, on_health=reports.append)
    written = _tensor(out)
    (report,) = reports
    (entry,) = report.nonfinite_outputs
    assert entry.tensor == TENSOR and entry.count == _nonfinite(written) > 0
    assert [i.model for i in entry.inputs] == [str(poisoned)]
    assert entry.inputs[0].count == _nonfinite(_tensor(poisoned)) == 1
    assert report.tensors_written == len(read_state(out))
    assert any(TENSOR in w and "--allow-nonfinite" in w for w in report.warnings)


@pytest.mark.faults
def test_ties_dropping_a_nan_warns_naming_it(llama, bad, tmp_path, capsys):
    """TIES's sign election drops a NaN of a fine-tune (NaN >= 0 is false, so it never counts): the
    merge succeeds, and says which tensor of which model had it."""
    cfg = tmp_path / "ties.yml"
    cfg.write_text(
        f"models:\n  - model: {bad['nan']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"base_model: {llama['base']}\nmerge_method: ties\n"
    )
    out = tmp_path / "out"
    assert run_yaml(cfg, out, quiet=False) == 0
    assert _nonfinite(_tensor(out)) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: tensor '{TENSOR}': input {bad['nan']} has 1 NaN/Inf value" in err
    assert "did not carry it into the output" in err
    assert "health: " in err
    # --quiet: errors only, and this is a warning
    assert run_yaml(cfg, tmp_path / "quiet") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.faults
def test_an_inf_that_ties_keeps_is_refused(llama, bad, tmp_path, capsys):
    """+Inf wins TIES's election for its sign and reaches the output: exit 1, one error line."""
    cfg = tmp_path / "ties.yml"
    cfg.write_text(
        f"models:\n  - model: {bad['inf']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"base_model: {llama['base']}\nmerge_method: ties\n"
    )
    assert run_yaml(cfg, tmp_path / "out", check=False) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: tensor '{TENSOR}'" in err and str(bad["inf"]) in err and "--allow-nonfinite" in err
    assert "Traceback" not in err


@pytest.mark.faults
def test_finite_inputs_that_overflow_bf16_are_reported(llama, bad, tmp_path, capsys):
    """1.7e38 + 1.7e38 is finite in float32 but rounds past the largest bfloat16 (~3.39e38)."""
    cfg = tmp_path / "big.yml"
    cfg.write_text(
        f"models:\n  - model: {bad['big1']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {bad['big2']}\n    parameters: {{weight: 1.0}}\n"
        "merge_method: linear\nparameters: {normalize: false}\ndtype: bfloat16\n"
    )
    assert run_yaml(cfg, tmp_path / "refused", check=False) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"tensor '{TENSOR}'" in err and "every input is finite" in err and "an overflow of bfloat16" in err
    reports: list[HealthReport] = []
    from mergekitty import run_merge

    run_merge(cfg, tmp_path / "out", quiet=True, allow_nonfinite=True, on_health=reports.append)
    golden = (_tensor(bad["big1"]).float() + _tensor(bad["big2"]).float()).to(torch.bfloat16)
    written = _tensor(tmp_path / "out")
    assert torch.isinf(golden).all() and torch.equal(written, golden)
    (entry,) = reports[0].nonfinite_outputs
    assert entry.tensor == TENSOR and entry.count == golden.numel() and entry.inputs == ()
    assert reports[0].nonfinite_inputs == []


@pytest.mark.faults
def test_finite_float64_inputs_that_overflow_the_output_dtype_are_refused(llama, bad, tmp_path):
    from mergekitty import run_merge

    cfg = (
        f"models:\n  - model: {bad['f64-huge']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\ndtype: bfloat16\n"
    )
    with pytest.raises(NonFiniteError, match="every input is finite") as info:
        run_merge(cfg, tmp_path / "out", quiet=True)
    assert info.value.tensor == TENSOR and info.value.models == ()


def _torch_sumsq(t: torch.Tensor) -> float:
    return _norm(t) ** 2


def _family(dtype, n=70_001, k=3):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    xs = [base + 0.05 * torch.randn(n, generator=g) for _ in range(k)]
    xs[0][[3, 4000]] = torch.tensor([float("nan"), float("inf")])
    xs[1][n - 1] = -float("inf")
    base[17] = float("nan")
    return base.to(dtype), [x.to(dtype) for x in xs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_figures_equal_torch(dtype):
    """The counts and sums of squares the kernels return, against torch on the same tensors."""
    from mergekitty.kernels import GtaSpec, Sparsity
    from mergekitty.ops.native_dispatch import gta_merge_views

    base, xs = _family(dtype)
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    out = torch.empty_like(base)
    h = _native.weighted_sum([bytes_view(x) for x in xs], [code] * 3, [0.5, 0.3, 0.2], bytes_view(out), code, 2)
    assert h.input_nonfinite == [_nonfinite(x) for x in xs] == [2, 1, 0]
    assert h.input_sumsq == pytest.approx([_torch_sumsq(x) for x in xs], rel=1e-5)
    assert h.output_nonfinite == _nonfinite(out) == 3
    # the output's squares are those of the float32 sums: within the rounding to the dtype
    assert h.output_sumsq == pytest.approx(_torch_sumsq(out), rel=1e-3)

    spec = GtaSpec(tuple(Sparsity("magnitude", 0.5) for _ in xs), (0.5, 0.3, 0.2), True, True, 1.0)
    h = gta_merge_views(
        [bytes_view(x) for x in xs], [code] * 3, bytes_view(base), code, tuple(base.shape), spec, 1, bytes_view(out), code, 2
    )  # fmt: skip
    assert h.input_nonfinite == [*(_nonfinite(x) for x in xs), 1]
    assert h.input_sumsq == pytest.approx([*(_torch_sumsq(x) for x in xs), _torch_sumsq(base)], rel=1e-5)
    assert h.output_nonfinite == _nonfinite(out)
    assert h.output_sumsq == pytest.approx(_torch_sumsq(out), rel=1e-3)

    scanned = _native.scan_health(bytes_view(xs[0]), code)
    assert scanned.input_nonfinite == [2] and scanned.output_nonfinite == 2
    assert scanned.output_sumsq == pytest.approx(_torch_sumsq(xs[0]), rel=1e-5)


def test_figures_of_other_dtypes_and_devices_equal_torch():
    """F64 copies and tensors off the native path (torch in float64 chunks)."""
    t = torch.randn(5000, dtype=torch.float64) * 1e100
    t[[1, 2]] = torch.tensor([float("nan"), float("-inf")], dtype=torch.float64)
    f = buffer_figures(bytes_view(t), "F64", t.numel())
    assert f is not None and f.nonfinite == 2 and f.sumsq == pytest.approx(_torch_sumsq(t), rel=1e-12)
    g = tensor_figures(t)
    assert g is not None and g.nonfinite == 2 and g.sumsq == pytest.approx(f.sumsq, rel=1e-12)
    # 1e308 is finite in float64, its square is not: the norm says so, the count does not
    huge = torch.full((3,), 1e308, dtype=torch.float64)
    f = buffer_figures(bytes_view(huge), "F64", 3)
    assert f is not None and f.nonfinite == 0 and f.sumsq == math.inf
    assert tensor_figures(torch.arange(4)) is None and buffer_figures(b"\0" * 8, "I64", 1) is None


def test_health_json_is_written_with_the_model(llama, bad, tmp_path):
    cfg = tmp_path / "ties.yml"
    cfg.write_text(
        f"models:\n  - model: {bad['nan']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"base_model: {llama['base']}\nmerge_method: dare_ties\nrandom_seed: 1234\n"
    )
    out = tmp_path / "out"
    assert run_yaml(cfg, out, "--json") == 0
    report = json.loads((out / HEALTH_FILE).read_text())
    written = read_state(out)
    assert report["format"] == "mergekitty-health/1" and report["method"] == "dare_ties"
    assert report["random_seed"] == 1234 and report["allow_nonfinite"] is False
    assert report["tensors_written"] == report["tensors_checked"] == len(written)
    dropped = [i for i in report["nonfinite_inputs"] if not i["reached_output"]]
    # DARE keeps or drops the NaN at random; TIES's election drops what DARE kept
    assert dropped == [
        {"tensor": TENSOR, "model": str(bad["nan"]), "source": TENSOR, "count": 1, "reached_output": False}
    ]
    assert report["nonfinite_outputs"] == [] and report["norm_outliers"] == []
    by_name = {t["name"]: t for t in report["tensors"]}
    assert set(by_name) == set(written)
    inputs = {str(llama["base"]): read_state(llama["base"]), str(llama["ft2"]): read_state(llama["ft2"])}
    inputs[str(bad["nan"])] = read_state(bad["nan"])
    for name, entry in by_name.items():
        assert entry["output_norm"] == pytest.approx(_norm(written[name]), rel=1e-3), name
        assert [p["model"] for p in entry["parents"]] == [str(llama["base"]), str(bad["nan"]), str(llama["ft2"])]
        for p in entry["parents"]:
            assert p["norm"] == pytest.approx(_norm(inputs[p["model"]][name]), rel=1e-5), (name, p)


def test_no_json_without_the_option(llama, tmp_path, write_yaml):
    cfg = write_yaml(
        f"models:\n  - model: {llama['ft1']}\n  - model: {llama['ft2']}\n"
        "merge_method: linear\nparameters: {weight: 0.5}\n"
    )
    assert run_yaml(cfg, tmp_path / "out") == 0
    assert not (tmp_path / "out" / HEALTH_FILE).exists()


def test_a_norm_far_from_every_parent_is_warned(llama, tmp_path, capsys):
    """Weights of 5 without normalizing: the output is ~10x every parent (a wrong parameter)."""
    cfg = tmp_path / "big.yml"
    cfg.write_text(
        f"models:\n  - model: {llama['ft1']}\n    parameters: {{weight: 5.0}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 5.0}}\n"
        "merge_method: linear\nparameters: {normalize: false}\n"
    )
    assert run_yaml(cfg, tmp_path / "out", quiet=False) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: tensor '{TENSOR}': output norm" in err and "check the merge parameters" in err
    a, b = (_tensor(llama[m]) for m in ("ft1", "ft2"))
    ratio = _norm(5 * a.double() + 5 * b.double()) / max(_norm(a), _norm(b))
    assert ratio > 4 and f"is {ratio:.3g}x its largest parent's" in err


@pytest.mark.parametrize(
    "method,params",
    [("linear", "weight: 0.5"), ("ties", "weight: 0.5, density: 0.5"), ("della", "weight: 0.5, density: 0.5, epsilon: 0.1")],
)  # fmt: skip
def test_normal_merges_raise_no_alarm(method, params, llama, tmp_path):
    from mergekitty import run_merge

    models = "".join(f"  - model: {llama[m]}\n    parameters: {{{params}}}\n" for m in ("ft1", "ft2", "ft3"))
    reports: list[HealthReport] = []
    run_merge(
        f"models:\n{models}base_model: {llama['base']}\nmerge_method: {method}\n",
        tmp_path / "out",
        quiet=True,
        on_health=reports.append,
    )
    (report,) = reports
    assert report.norm_outliers == [] and report.nonfinite_inputs == [] and report.warnings == []
    assert report.summary_lines()[0].startswith(f"health: {report.tensors_written} tensors, no NaN/Inf, norms in range")
    assert all(math.isfinite(n) and n > 0 for _, n, _ in report.norms)


def test_summary_is_printed_unless_quiet(llama, tmp_path, write_yaml, capsys):
    from mergekitty.cli.yaml_cmd import main

    cfg = write_yaml(
        f"models:\n  - model: {llama['ft1']}\n  - model: {llama['ft2']}\n"
        "merge_method: linear\nparameters: {weight: 0.5}\nrandom_seed: 7\n"
    )
    main([str(cfg), str(tmp_path / "out"), "--no-quiet"], standalone_mode=False)
    err = capsys.readouterr().err
    n = len(read_state(tmp_path / "out"))
    assert f"health: {n} tensors, no NaN/Inf, norms in range\n" in err  # linear draws no random numbers
