"""``mergekitty inspect``: the native figures kernel against its torch reference, the figures of
tiny models against a plain torch computation, and the command's outputs (table, JSON, HTML,
PNG, a config's parameters) and errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_state, run_cli

torch = pytest.importorskip("torch")

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _native_stats(base, models, density, threads=1):
    import numpy as np

    from mergekitty import _native

    codes = {v: k for k, v in DTYPES.items()}
    flat = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in (base, *models)]
    scratch = np.empty(max(base.numel(), 1), dtype=np.float32)
    return _native.task_vector_stats(
        flat[0], codes[base.dtype], flat[1:], [codes[m.dtype] for m in models], density, scratch, threads
    )


def _assert_same_stats(got, want):
    for key in ("numel", "base_nonfinite", "nonzero", "nonfinite", "ties_kept", "both_nonzero", "sign_agree"):
        assert got[key] == want[key], key
    for key in ("base_sumsq", "sumsq", "sum4", "ties_sumsq", "dot"):
        g, w = got[key], want[key]
        for a, b in zip(g if isinstance(g, list) else [g], w if isinstance(w, list) else [w]):
            # float32 products summed in float64 against float64 products
            assert a == pytest.approx(b, rel=1e-5, abs=1e-30), key


def _family(shape, k, dtype, seed):
    """A base and ``k`` fine-tunes; a fifth of each fine-tune's elements left unchanged."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.02
    models = []
    for _ in range(k):
        change = torch.randn(shape, generator=gen) * 0.002
        change[torch.rand(shape, generator=gen) < 0.2] = 0
        models.append((base + change).to(dtype))
    return base.to(dtype), models


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(7,), (33, 65), (300, 257)])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_kernel_matches_torch_reference(dtype, shape, density):
    from mergekitty.ops.task_vector_stats import task_vector_stats_reference

    base, models = _family(shape, 3, DTYPES[dtype], seed=sum(shape))
    want = task_vector_stats_reference(base, models, density)
    for threads in (1, 2):
        _assert_same_stats(_native_stats(base, models, density, threads), want)


def test_kernel_mixed_dtypes_and_nonfinite():
    from mergekitty.ops.task_vector_stats import task_vector_stats_reference

    base, models = _family((1000,), 2, torch.float32, seed=3)
    base[5] = float("nan")
    models[0][7] = float("inf")
    models = [models[0], models[1].to(torch.bfloat16)]
    want = task_vector_stats_reference(base, models, 0.3)
    assert want["nonfinite"] == [2, 1] and want["base_nonfinite"] == 1
    _assert_same_stats(_native_stats(base, models, 0.3), want)


def test_kernel_bad_arguments_are_errors():
    import numpy as np

    from mergekitty import _native
    from mergekitty.errors import InvalidArgumentError

    x = np.zeros(4, dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match="model 0"):
        _native.task_vector_stats(x, "F32", [np.zeros(3, dtype=np.float32)], ["F32"], 0.5, np.empty(4, np.float32))
    with pytest.raises(InvalidArgumentError, match="scratch"):
        _native.task_vector_stats(x, "F32", [x], ["F32"], 0.5, np.empty(2, np.float32))
    with pytest.raises(InvalidArgumentError):
        _native.task_vector_stats(x, "I8", [x], ["F32"], 0.5, np.empty(4, np.float32))


def test_cell_figures_from_sums():
    """The ratios, on the explicit example d_1 = [1, -2, 0, 4], d_2 = [1, 3, 3, -4], B = [1, 1, 1, 1]."""
    from mergekitty.inspect.figures import CellSums

    cell = CellSums(2)
    cell.add_tensor(
        {
            "numel": 4,
            "base_sumsq": 4.0,
            "sumsq": [21.0, 35.0],
            "sum4": [273.0, 419.0],
            "nonfinite": [0, 0],
            "ties_sumsq": [20.0, 34.0],
            "dot": [-21.0],
            "both_nonzero": [3],
            "sign_agree": [1],
        }
    )
    assert cell.relative_norm(0) == pytest.approx(math.sqrt(21) / 2)
    assert cell.cosine(0) == pytest.approx(-21 / math.sqrt(21 * 35))
    assert cell.sign_agreement(0) == pytest.approx(1 / 3)
    assert cell.ties_keep(1) == pytest.approx(34 / 35)
    assert cell.dare_spread(0, 0.25) == pytest.approx(math.sqrt(3) * math.sqrt(273) / 21)
    empty = CellSums(2)  # no change, no base: the ratios are undefined
    assert (empty.relative_norm(0), empty.cosine(0), empty.sign_agreement(0), empty.ties_keep(0)) == (None,) * 4


def test_module_kinds():
    from mergekitty.inspect.modules import kind_of

    cases = {
        "model.embed_tokens.weight": "embedding",
        "lm_head.weight": "embedding",
        "self_attn.q_proj.weight": "attention",
        "self_attn.q_norm.weight": "norm",
        "attention.query_key_value.weight": "attention",
        "attn.c_attn.weight": "attention",
        "mlp.down_proj.weight": "mlp",
        "mlp.dense_h_to_4h.weight": "mlp",
        "block_sparse_moe.experts.0.w1.weight": "mlp",
        "block_sparse_moe.gate.weight": "mlp",
        "input_layernorm.weight": "norm",
        "ln_1.weight": "norm",
        "transformer.ln_f.weight": "norm",
        "rotary_emb.inv_freq": "other",
    }
    assert {name: kind_of(name) for name in cases} == cases


# ---------------------------------------------------------------------------- on tiny models


def _torch_cells(base_dir: Path, model_dirs: list[Path], density: float):
    """The figures per (row, kind), computed from the checkpoints with plain torch (llama names)."""
    base = read_state(base_dir)
    models = [read_state(d) for d in model_dirs]
    sums: dict = {}
    for name, b in base.items():
        if name.startswith("model.layers."):
            row, rest = name.split(".")[2], name
            kind = "norm" if "norm" in rest else "attention" if "self_attn" in rest else "mlp"
        else:
            row = "pre" if "embed_tokens" in name else "post"
            kind = "norm" if name == "model.norm.weight" else "embedding"
        s = sums.setdefault((row, kind), {"b": 0.0, "d2": [0.0] * len(models), "keep": [0.0] * len(models)})
        ds = [m[name].double() - b.double() for m in models]
        s["b"] += float(b.double().square().sum())
        for i, d in enumerate(ds):
            s["d2"][i] += float(d.square().sum())
            k = max(1, math.floor(density * d.numel()))
            top = d.abs().reshape(-1).topk(k).values[-1]
            s["keep"][i] += float(d[d.abs() >= top].square().sum())
        for i in range(len(ds)):
            for j in range(i + 1, len(ds)):
                a, c = ds[i], ds[j]
                both = (a != 0) & (c != 0)
                key = (i, j)
                s.setdefault("dot", {}).setdefault(key, 0.0)
                s["dot"][key] += float((a * c).sum())
                s.setdefault("agree", {}).setdefault(key, [0, 0])
                s["agree"][key][0] += int((both & (a.sign() == c.sign())).sum())
                s["agree"][key][1] += int(both.sum())
    return sums


def test_figures_match_torch_on_tiny_models(llama):
    from mergekitty.inspect import inspect_models, open_model

    dirs = [llama["ft1"], llama["ft2"], llama["ft3"]]
    inspection = inspect_models(open_model(str(llama["base"])), [open_model(str(d)) for d in dirs], 0.3, threads=2)
    want = _torch_cells(llama["base"], dirs, 0.3)
    assert set(inspection.cells) == set(want)
    assert inspection.rows == ["pre", "0", "1", "2", "3", "post"]
    for key, s in want.items():
        cell = inspection.cells[key]
        for i in range(3):
            assert cell.relative_norm(i) == pytest.approx(math.sqrt(s["d2"][i] / s["b"]), rel=1e-5), key
            assert cell.ties_keep(i) == pytest.approx(s["keep"][i] / s["d2"][i], rel=1e-5), key
        for p, (i, j) in enumerate(inspection.pairs):
            cos = s["dot"][(i, j)] / math.sqrt(s["d2"][i] * s["d2"][j])
            assert cell.cosine(p) == pytest.approx(cos, rel=1e-4, abs=1e-6), key
            agree, both = s["agree"][(i, j)]
            assert cell.sign_agreement(p) == pytest.approx(agree / both), key


def inspect_cli(*args, capsys) -> tuple[int, str, str]:
    """``mergekitty inspect ARGS`` in this process: (exit code, stdout, stderr)."""
    from mergekitty.cli.main import group

    code = 0
    try:
        group(["inspect", *map(str, args)], standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_table(llama):
    proc = run_cli("mergekitty", "inspect", llama["base"], llama["ft1"], llama["ft2"])
    out = proc.stdout
    assert "relative norm |d|/|B|" in out and "cosine of the task vectors" in out
    for token in ("attn", "mlp", "norm", "embed", "ft1~ft2", "pre", "post", "TIES keep @0.5"):
        assert token in out, token
    lines = [line for line in out.splitlines() if line.strip().startswith("│")]
    assert any(line.split("│")[1].strip() == "3" for line in lines)  # a row per layer
    assert "Traceback" not in proc.stderr


def test_json_parses_and_matches_the_figures(llama, capsys):
    from mergekitty.inspect import inspect_models, open_model

    code, out, _ = inspect_cli(
        llama["ft1"], llama["ft2"], "--base", llama["base"], "--json", "--density", "0.25", capsys=capsys
    )
    assert code == 0
    data = json.loads(out)
    assert data["format"] == "mergekitty-inspect/1"
    assert data["names"] == ["ft1", "ft2"] and data["pairs"] == [[0, 1]] and data["density"] == 0.25
    assert data["kinds"] == ["attention", "mlp", "norm", "embedding"]
    direct = inspect_models(
        open_model(str(llama["base"])), [open_model(str(llama["ft1"])), open_model(str(llama["ft2"]))], 0.25
    )
    cell = next(c for c in data["cells"] if c["row"] == "2" and c["kind"] == "mlp")
    assert cell["tensors"] == 3
    assert cell["relative_norm"] == pytest.approx([direct.cells[("2", "mlp")].relative_norm(i) for i in range(2)])
    assert cell["ties_keep"][0] == pytest.approx(direct.cells[("2", "mlp")].ties_keep(0))
    assert set(data["totals"]) == {"attention", "mlp", "norm", "embedding", "all"}


def _config(tmp_path: Path, llama) -> Path:
    path = tmp_path / "ties.yml"
    path.write_text(
        f"""
base_model: {llama["base"]}
models:
  - model: {llama["ft1"]}
    parameters:
      weight: [0, 0.5, 1]
      density: 0.7
  - model: {llama["ft2"]}
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - value: 0.6
      density: 0.5
merge_method: ties
"""
    )
    return path


def test_config_shows_the_gradient_per_layer(llama, tmp_path, capsys):
    config = _config(tmp_path, llama)
    code, out, err = inspect_cli("--config", config, "--json", "--quiet", capsys=capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["base"] == str(llama["base"]) and len(data["models"]) == 2  # from the config
    weights = {(p["name"], Path(p["model"]).name if p["model"] else None): p for p in data["parameters"]}
    ft1 = {(c["row"], c["kind"]): c["mean"] for c in weights[("weight", "ft1")]["cells"]}
    # four layers: t = 0, 1/3, 2/3, 1 on the gradient [0, 0.5, 1]; before the stack t = 0, after it t = 1
    for layer, t in enumerate((0, 1 / 3, 2 / 3, 1)):
        for kind in ("attention", "mlp", "norm"):
            assert ft1[(str(layer), kind)] == pytest.approx(t)
    assert ft1[("pre", "embedding")] == 0 and ft1[("post", "embedding")] == 1
    ft2 = {(c["row"], c["kind"]): c["mean"] for c in weights[("weight", "ft2")]["cells"]}
    assert ft2[("1", "attention")] == pytest.approx(0.3) and ft2[("1", "mlp")] == pytest.approx(0.6)
    assert {c["mean"] for c in weights[("density", "ft1")]["cells"]} == {0.7}

    code, out, _ = inspect_cli("--config", config, "--quiet", capsys=capsys)
    assert code == 0
    assert "config parameters" in out and "weight (ft1)" in out
    row2 = next(
        line
        for line in out.splitlines()
        if line.strip().startswith("│") and line.split("│")[1].strip() == "2" and "attn=0.3" in line
    )
    assert "0.667" in row2


def test_html_report(llama, tmp_path, capsys):
    from mergekitty.inspect.picture import have_matplotlib

    report = tmp_path / "report.html"
    code, _, err = inspect_cli(llama["base"], llama["ft1"], llama["ft2"], "-o", report, "--quiet", capsys=capsys)
    assert code == 0, err
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<table") >= 6
    assert "ft1~ft2" in text and "TIES keep fraction" in text and "what the figures mean" in text
    if have_matplotlib():
        assert "data:image/png;base64," in text
    else:
        assert "pip install &#x27;mergekitty[plot]&#x27;" in text


def test_png_report(llama, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    picture = tmp_path / "report.png"
    config = _config(tmp_path, llama)
    code, _, err = inspect_cli("--config", config, "-o", picture, "--quiet", capsys=capsys)
    assert code == 0, err
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(str(picture))
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()}
    assert len(colours) > 100  # heatmaps, not a blank page
    assert pixels.shape[0] > 600 and pixels.shape[1] > 400


def test_without_matplotlib(llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, _, err = inspect_cli(llama["base"], llama["ft1"], "-o", tmp_path / "r.png", "--quiet", capsys=capsys)
    assert code == 1
    assert err.strip() == "error: writing a picture needs matplotlib: pip install 'mergekitty[plot]'"
    assert not (tmp_path / "r.png").exists()
    code, _, err = inspect_cli(llama["base"], llama["ft1"], "-o", tmp_path / "r.html", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "No picture: writing a picture needs matplotlib" in (tmp_path / "r.html").read_text()


def test_runs_without_torch(llama):
    """The whole command, torch and transformers made unimportable."""
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from mergekitty.cli.main import group
try:
    group(sys.argv[1:], standalone_mode=False)
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, "inspect", str(llama["base"]), str(llama["ft1"]), "--json", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["names"] == ["ft1"]
    assert "torch imported: False" in proc.stderr


# ---------------------------------------------------------------------------- errors


def _save(directory: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_missing_model_is_one_line(llama, tmp_path, capsys):
    code, _, err = inspect_cli(llama["base"], tmp_path / "nope", capsys=capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: model directory not found:") and "nope" in err


def test_no_common_tensors(tmp_path, capsys):
    a = _save(tmp_path / "a", {"x.weight": torch.ones(4)})
    b = _save(tmp_path / "b", {"y.weight": torch.ones(4)})
    code, _, err = inspect_cli(a, b, capsys=capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the models have no tensor in common") and err.count("error") == 1


def test_shape_mismatch_skips_the_tensor_with_a_warning(tmp_path, capsys):
    a = _save(tmp_path / "a", {"x.weight": torch.ones(4), "y.weight": torch.ones(2, 3)})
    b = _save(tmp_path / "b", {"x.weight": torch.full((4,), 2.0), "y.weight": torch.ones(3, 2)})
    code, out, err = inspect_cli(a, b, "--json", capsys=capsys)
    assert code == 0, err
    assert "tensor 'y.weight' is left out: shape 3x2 in " in err
    data = json.loads(out)
    assert "y.weight" in data["skipped"]
    assert data["totals"]["all"]["relative_norm"] == [pytest.approx(1.0)]  # |2 - 1| / |1| over x only
