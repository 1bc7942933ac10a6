"""The geometric methods (slerp/nuslerp, multislerp, karcher, model_stock, nearswap, sce,
arcee_fusion) against independent, straightforward computations of their formulas (numpy
float64 and python loops), their edge cases, plan-time validation and end-to-end CLI runs."""

import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from mergekitty.api import plan_merge
from mergekitty.errors import ConfigError
from mergekitty.methods.base import MergeInputs
from mergekitty.methods.registry import get_method

NAME = "model.layers.0.mlp.up_proj.weight"


def _inputs(tensors, model_params=None, base=None, out_dtype=torch.float32, out=None, name=NAME, **params):
    return MergeInputs(
        name=name,
        tensors=list(tensors),
        model_params=list(model_params) if model_params is not None else [{} for _ in tensors],
        params=params,
        base=base,
        out_dtype=out_dtype,
        out=out,
    )


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _np(x):
    return x.double().numpy()


def _close(got, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(got.double().numpy(), np.asarray(expected, dtype=np.float64), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ references (independent)
def ref_slerp(t, v0, v1):
    """Textbook slerp of two numpy vectors, lerp when (nearly) colinear or zero."""
    v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    n0, n1 = math.sqrt(float(np.dot(v0, v0))), math.sqrt(float(np.dot(v1, v1)))
    if n0 == 0 or n1 == 0:
        return (1 - t) * v0 + t * v1
    dot = float(np.dot(v0, v1)) / (n0 * n1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return math.sin((1 - t) * theta) / math.sin(theta) * v0 + math.sin(t * theta) / math.sin(theta) * v1


def _slerp(t, base, other, **extra):
    params = {"t": t, "nuslerp_flatten": True, "nuslerp_row_wise": False, **extra}
    return get_method("slerp").merge(_inputs([other], [{"weight": None}], base=base, **params))


def _nuslerp(w1, w2, x1, x2, base=None, flatten=True, row_wise=False, **kw):
    params = {"t": None, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    return get_method("nuslerp").merge(_inputs([x1, x2], [{"weight": w1}, {"weight": w2}], base=base, **params, **kw))


# ------------------------------------------------------------------ slerp
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_t_interpolates_from_base_to_other(t):
    base, other = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    got = _slerp(t, base, other)
    expected = ref_slerp(t, _np(base).ravel(), _np(other).ravel()).reshape(6, 5)
    _close(got, expected)
    if t == 0.0:
        assert torch.equal(got, base)
    if t == 1.0:
        assert torch.equal(got, other)


def test_slerp_midpoint_of_orthogonal_vectors_by_hand():
    base, other = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    # theta = pi/2: both coefficients sin(pi/4)/1
    _close(_slerp(0.5, base, other), [math.sqrt(2), math.sqrt(2)])


def test_slerp_half_precision_inputs_computed_in_float32():
    base, other = _rand(8, 8, seed=3).bfloat16(), _rand(8, 8, seed=4).bfloat16()
    got = get_method("slerp").merge(
        _inputs([other], [{"weight": None}], base=base, out_dtype=torch.bfloat16, t=0.3, nuslerp_flatten=True, nuslerp_row_wise=False)
    )
    assert got.dtype == torch.bfloat16
    expected = torch.tensor(ref_slerp(0.3, _np(base).ravel(), _np(other).ravel()).reshape(8, 8), dtype=torch.float32).bfloat16()
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2**-7)


def test_slerp_writes_into_out_buffer():
    base, other = _rand(4, 3, seed=5), _rand(4, 3, seed=6)
    out = torch.empty(4, 3, dtype=torch.float16)
    got = get_method("slerp").merge(
        _inputs([other], [{"weight": None}], base=base, out_dtype=torch.float16, out=out, t=0.5, nuslerp_flatten=True, nuslerp_row_wise=False)
    )
    assert got.data_ptr() == out.data_ptr()
    _close(out, ref_slerp(0.5, _np(base).ravel(), _np(other).ravel()).reshape(4, 3), atol=2e-3, rtol=2e-3)


def test_slerp_degenerate_vectors_fall_back_to_lerp():
    v = torch.tensor([1.0, 2.0, -3.0])
    # antipodal: the midpoint is the lerp, i.e. zero here, never NaN
    assert torch.equal(_slerp(0.5, v, -v), torch.zeros(3))
    _close(_slerp(0.25, v, -2 * v), 0.75 * _np(v) + 0.25 * _np(-2 * v))
    # parallel with different norms: lerp of the norms
    _close(_slerp(0.5, v, 3 * v), 2 * _np(v))
    # a zero vector
    _close(_slerp(0.5, v, torch.zeros(3)), 0.5 * _np(v))
    assert torch.equal(_slerp(0.5, torch.zeros(3), torch.zeros(3)), torch.zeros(3))
    # nearly parallel (cos > 0.9995): lerp
    w = v + torch.tensor([0.0, 0.0, 0.01])
    _close(_slerp(0.5, v, w), 0.5 * (_np(v) + _np(w)))


def test_slerp_only_base_passes_through():
    base = _rand(3, 3)
    got = get_method("slerp").merge(_inputs([], [], base=base, t=0.5, nuslerp_flatten=True, nuslerp_row_wise=False))
    assert torch.equal(got, base)


def test_nuslerp_weights_give_t_and_order_is_config_order():
    x1, x2 = _rand(5, 4, seed=7), _rand(5, 4, seed=8)
    got = _nuslerp(1.0, 3.0, x1, x2)  # t = 3/4 towards x2
    _close(got, ref_slerp(0.75, _np(x1).ravel(), _np(x2).ravel()).reshape(5, 4))
    # weights summing to zero: t = 0.5, finite
    got = _nuslerp(1.0, -1.0, x1, x2)
    _close(got, ref_slerp(0.5, _np(x1).ravel(), _np(x2).ravel()).reshape(5, 4))


def test_nuslerp_with_base_slerps_task_vectors():
    b, x1, x2 = _rand(5, 4, seed=9), _rand(5, 4, seed=10), _rand(5, 4, seed=11)
    got = _nuslerp(2.0, 1.0, x1, x2, base=b)
    d1, d2 = (_np(x1) - _np(b)).ravel(), (_np(x2) - _np(b)).ravel()
    _close(got, _np(b) + ref_slerp(1 / 3, d1, d2).reshape(5, 4))


def test_nuslerp_row_wise_slerps_rows_and_column_wise_columns():
    x1, x2 = _rand(3, 4, seed=12), _rand(3, 4, seed=13)
    a, b = _np(x1), _np(x2)
    rows = np.stack([ref_slerp(0.5, a[i, :], b[i, :]) for i in range(3)])
    cols = np.stack([ref_slerp(0.5, a[:, j], b[:, j]) for j in range(4)], axis=1)
    _close(_nuslerp(1.0, 1.0, x1, x2, flatten=False, row_wise=True), rows)
    _close(_nuslerp(1.0, 1.0, x1, x2, flatten=False, row_wise=False), cols)
    assert not np.allclose(rows, cols)
    # a 1-D tensor is one vector either way
    v1, v2 = _rand(7, seed=14), _rand(7, seed=15)
    for rw in (True, False):
        _close(_nuslerp(1.0, 1.0, v1, v2, flatten=False, row_wise=rw), ref_slerp(0.5, _np(v1), _np(v2)))


def test_nuslerp_rows_with_antipodal_and_zero_rows_are_finite():
    x1 = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    x2 = torch.tensor([[-1.0, -2.0], [1.0, 1.0], [1.0, 3.0]])
    got = _nuslerp(1.0, 1.0, x1, x2, flatten=False, row_wise=True)
    expected = np.stack([ref_slerp(0.5, _np(x1)[i], _np(x2)[i]) for i in range(3)])
    assert np.allclose(expected[0], 0) and np.allclose(expected[1], [0.5, 0.5])
    _close(got, expected)


def test_slerp_t_wins_over_weights():
    base, other = _rand(4, 4, seed=16), _rand(4, 4, seed=17)
    got = get_method("slerp").merge(
        _inputs([other], [{"weight": 5.0}], base=base, t=0.0, nuslerp_flatten=True, nuslerp_row_wise=False)
    )
    assert torch.equal(got, base)


# ------------------------------------------------------------------ plan-time validation
def _config(fixture, method, models, params=None, base=True, global_params=None):
    lines = []
    if base:
        lines.append(f"base_model: {fixture['base']}")
    lines.append("models:")
    for i, key in enumerate(models):
        lines.append(f"  - model: {fixture[key]}")
        p = (params or {}).get(key)
        if p:
            lines.append(f"    parameters: {p}")
    lines.append(f"merge_method: {method}")
    if global_params:
        lines.append(f"parameters: {global_params}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "models,params,base,global_params,match",
    [
        (["ft1"], None, True, "{t: 1.5}", "'t' must be <= 1"),
        (["ft1"], None, True, "{t: -0.1}", "'t' must be >= 0"),
        (["ft1", "ft2"], None, True, "{t: 0.5}", "base model and one other model"),
        (["ft1", "ft2"], None, False, "{t: 0.5}", "base model and one other model"),
        (["ft1", "ft2"], {"ft1": "{weight: 1.0}"}, False, None, "either a global 't' or a 'weight'"),
        (["ft1"], {"ft1": "{weight: 1.0}"}, True, None, "exactly two models besides the base"),
        (["ft1", "ft2", "ft3"], None, True, "{t: 0.5}", "at most 2"),
    ],
)
def test_slerp_rejects_bad_configs(llama, models, params, base, global_params, match):
    with pytest.raises(ConfigError, match=match):
        plan_merge(_config(llama, "slerp", models, params, base, global_params))


def test_slerp_accepts_t_with_base_listed_and_nuslerp_alias(llama):
    plan = plan_merge(_config(llama, "slerp", ["ft1", "base"], global_params="{t: 0.5}"))
    assert all(j.base is not None and len(j.sources) == 1 for j in plan.jobs)
    plan = plan_merge(_config(llama, "nuslerp", ["ft1", "ft2"], {"ft1": "{weight: 1}", "ft2": "{weight: 2}"}, base=False))
    assert all(len(j.sources) == 2 for j in plan.jobs)


# ------------------------------------------------------------------ end to end (CLI)
def _state(path):
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _finite_logits(model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = torch.arange(1, 17).view(2, 8) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    return logits


def _merge(write_yaml, tmp_path, text, name="out"):
    cfg = write_yaml(text, name=f"{name}.yml")
    out = tmp_path / name
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    _finite_logits(out)
    return _state(out)


KEYS = ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight")


def test_e2e_slerp_t0_is_base_listed_second_and_t_half(llama, tmp_path, write_yaml):
    base, ft1 = _state(llama["base"]), _state(llama["ft1"])
    got = _merge(write_yaml, tmp_path, _config(llama, "slerp", ["ft1", "base"], global_params="{t: 0.0}") + "dtype: float32\n", "t0")
    assert set(got) == set(base)
    for k in base:
        assert torch.equal(got[k], base[k]), k
    got = _merge(write_yaml, tmp_path, _config(llama, "slerp", ["ft1", "base"], global_params="{t: 0.5}") + "dtype: float32\n", "t05")
    for k in KEYS:
        _close(got[k], ref_slerp(0.5, _np(base[k]).ravel(), _np(ft1[k]).ravel()).reshape(base[k].shape))


def test_e2e_nuslerp_row_wise_with_base(mistral, tmp_path, write_yaml):
    text = _config(mistral, "nuslerp", ["ft1", "ft2"], {"ft1": "{weight: 1.0}", "ft2": "{weight: 3.0}"},
                   global_params="{nuslerp_flatten: false, nuslerp_row_wise: true}") + "dtype: float32\n"
    got = _merge(write_yaml, tmp_path, text)
    b, s1, s2 = (_state(mistral[k]) for k in ("base", "ft1", "ft2"))
    for k in KEYS:
        B, d1, d2 = _np(b[k]), _np(s1[k]) - _np(b[k]), _np(s2[k]) - _np(b[k])
        if B.ndim == 1:
            expected = B + ref_slerp(0.75, d1, d2)
        else:
            expected = B + np.stack([ref_slerp(0.75, d1[i], d2[i]) for i in range(B.shape[0])])
        _close(got[k], expected)
