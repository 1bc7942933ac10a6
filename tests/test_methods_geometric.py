"""The geometric methods (slerp/nuslerp, multislerp, karcher, model_stock, nearswap, sce,
arcee_fusion) against independent, straightforward computations of their formulas (numpy
float64 and python loops), their edge cases, plan-time validation and end-to-end CLI runs."""

import math

import numpy as np
import pytest
import torch

from helpers import model_logits, read_state, run_cli
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
        _inputs(
            [other],
            [{"weight": None}],
            base=base,
            out_dtype=torch.bfloat16,
            t=0.3,
            nuslerp_flatten=True,
            nuslerp_row_wise=False,
        )
    )
    assert got.dtype == torch.bfloat16
    expected = torch.tensor(
        ref_slerp(0.3, _np(base).ravel(), _np(other).ravel()).reshape(8, 8), dtype=torch.float32
    ).bfloat16()
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2**-7)


def test_slerp_writes_into_out_buffer():
    base, other = _rand(4, 3, seed=5), _rand(4, 3, seed=6)
    out = torch.empty(4, 3, dtype=torch.float16)
    got = get_method("slerp").merge(
        _inputs(
            [other],
            [{"weight": None}],
            base=base,
            out_dtype=torch.float16,
            out=out,
            t=0.5,
            nuslerp_flatten=True,
            nuslerp_row_wise=False,
        )
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
    for key in models:
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
        (["ft1"], None, False, "{t: 0.5}", "needs a base_model here: 't' interpolates from the base"),
    ],
)
def test_slerp_rejects_bad_configs(llama, models, params, base, global_params, match):
    with pytest.raises(ConfigError, match=match):
        plan_merge(_config(llama, "slerp", models, params, base, global_params))


def test_slerp_accepts_t_with_base_listed_and_nuslerp_alias(llama):
    plan = plan_merge(_config(llama, "slerp", ["ft1", "base"], global_params="{t: 0.5}"))
    assert all(j.base is not None and len(j.sources) == 1 for j in plan.jobs)
    plan = plan_merge(
        _config(llama, "nuslerp", ["ft1", "ft2"], {"ft1": "{weight: 1}", "ft2": "{weight: 2}"}, base=False)
    )
    assert all(len(j.sources) == 2 for j in plan.jobs)


# ------------------------------------------------------------------ end to end (CLI)
def _merge(write_yaml, tmp_path, text, name="out"):
    cfg = write_yaml(text, name=f"{name}.yml")
    out = tmp_path / name
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    assert torch.isfinite(model_logits(out)).all()
    return read_state(out)


KEYS = ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight")


@pytest.mark.slow
def test_e2e_slerp_t0_is_base_listed_second_and_t_half(llama, tmp_path, write_yaml):
    base, ft1 = read_state(llama["base"]), read_state(llama["ft1"])
    got = _merge(
        write_yaml,
        tmp_path,
        _config(llama, "slerp", ["ft1", "base"], global_params="{t: 0.0}") + "dtype: float32\n",
        "t0",
    )
    assert set(got) == set(base)
    for k in base:
        assert torch.equal(got[k], base[k]), k
    got = _merge(
        write_yaml,
        tmp_path,
        _config(llama, "slerp", ["ft1", "base"], global_params="{t: 0.5}") + "dtype: float32\n",
        "t05",
    )
    for k in KEYS:
        _close(got[k], ref_slerp(0.5, _np(base[k]).ravel(), _np(ft1[k]).ravel()).reshape(base[k].shape))


@pytest.mark.slow
def test_e2e_nuslerp_row_wise_with_base(mistral, tmp_path, write_yaml):
    text = (
        _config(
            mistral,
            "nuslerp",
            ["ft1", "ft2"],
            {"ft1": "{weight: 1.0}", "ft2": "{weight: 3.0}"},
            global_params="{nuslerp_flatten: false, nuslerp_row_wise: true}",
        )
        + "dtype: float32\n"
    )
    got = _merge(write_yaml, tmp_path, text)
    b, s1, s2 = (read_state(mistral[k]) for k in ("base", "ft1", "ft2"))
    for k in KEYS:
        B, d1, d2 = _np(b[k]), _np(s1[k]) - _np(b[k]), _np(s2[k]) - _np(b[k])
        if B.ndim == 1:
            expected = B + ref_slerp(0.75, d1, d2)
        else:
            expected = B + np.stack([ref_slerp(0.75, d1[i], d2[i]) for i in range(B.shape[0])])
        _close(got[k], expected)


# ------------------------------------------------------------------ model_stock
def ref_model_stock_t(offsets):
    """The paper's ratio from the mean pairwise cosine of numpy offset vectors."""
    n = len(offsets)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = offsets[i], offsets[j]
            na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
            cosines.append(0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb))
    cos = sum(cosines) / len(cosines)
    denom = 1 + (n - 1) * cos
    return 0.0 if abs(denom) < 1e-6 else n * cos / denom


def test_model_stock_t_from_known_angle():
    # two offsets at 60 degrees: cos = 1/2, t = 2 * 0.5 / 1.5 = 2/3
    base = torch.tensor([1.0, 1.0, 0.0])
    x1 = base + torch.tensor([2.0, 0.0, 0.0])
    x2 = base + torch.tensor([1.0, math.sqrt(3.0), 0.0])
    got = get_method("model_stock").merge(_inputs([x1, x2], base=base, filter_wise=False))
    t = 2 / 3
    _close(got, t * (_np(x1) + _np(x2)) / 2 + (1 - t) * _np(base))
    assert abs(ref_model_stock_t([_np(x1 - base), _np(x2 - base)]) - t) < 1e-7


def test_model_stock_three_models_matches_formula():
    base = _rand(6, 5, seed=20)
    shared = _rand(6, 5, seed=21)
    xs = [base + shared + 0.7 * _rand(6, 5, seed=22 + i) for i in range(3)]
    got = get_method("model_stock").merge(_inputs(xs, base=base, filter_wise=False))
    t = ref_model_stock_t([(_np(x) - _np(base)).ravel() for x in xs])
    assert 0 < t < 1
    _close(got, t * sum(_np(x) for x in xs) / 3 + (1 - t) * _np(base))


def test_model_stock_filter_wise_per_row():
    base = _rand(4, 6, seed=30)
    xs = [base + _rand(4, 6, seed=31) + 0.5 * _rand(4, 6, seed=32 + i) for i in range(2)]
    got = get_method("model_stock").merge(_inputs(xs, base=base, filter_wise=True))
    B, X = _np(base), [_np(x) for x in xs]
    expected = np.empty_like(B)
    for r in range(4):
        t = ref_model_stock_t([x[r] - B[r] for x in X])
        expected[r] = t * (X[0][r] + X[1][r]) / 2 + (1 - t) * B[r]
    _close(got, expected)
    # a 1-D tensor is one row
    b1, y = _rand(6, seed=40), [_rand(6, seed=41 + i) for i in range(2)]
    got = get_method("model_stock").merge(_inputs(y, base=b1, filter_wise=True))
    t = ref_model_stock_t([_np(v) - _np(b1) for v in y])
    _close(got, t * (_np(y[0]) + _np(y[1])) / 2 + (1 - t) * _np(b1))


def test_model_stock_degenerate_angles_are_defined():
    base = torch.zeros(3)
    d = torch.tensor([1.0, 2.0, 3.0])
    # opposite offsets: mergekit divides by 1 + cos = 0; here t = 0 -> the base
    got = get_method("model_stock").merge(_inputs([d, -d], base=base, filter_wise=False))
    assert torch.equal(got, base)
    # a model equal to the base: cos = 0 -> t = 0
    got = get_method("model_stock").merge(_inputs([d, base.clone()], base=base, filter_wise=False))
    assert torch.equal(got, base)
    # identical offsets: cos = 1 -> t = 1 -> their average
    got = get_method("model_stock").merge(_inputs([d, d.clone()], base=base, filter_wise=False))
    _close(got, _np(d))
    # tiny offsets are not treated as zero
    tiny = torch.tensor([1e-5, 2e-5, 0.0])
    got = get_method("model_stock").merge(_inputs([tiny, tiny.clone()], base=base, filter_wise=False))
    _close(got, _np(tiny), atol=1e-12, rtol=1e-5)


# ------------------------------------------------------------------ nearswap
def test_nearswap_thresholding_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, 5.0])
    other = torch.tensor([0.05, 0.2, 1.0, 1.0, 4.0])
    got = get_method("nearswap").merge(_inputs([other], base=base, t=0.1))
    # |diff| = .05 (<= t: take other), .2 (w = .5), 1 (w = .1), 0 (equal), 1 (w = .1)
    expected = [0.05, 0.5 * 0.2, 0.1 * 1.0, 1.0, 5.0 + 0.1 * (4.0 - 5.0)]
    _close(got, expected, atol=1e-7)
    x, b = _rand(5, 5, seed=50), _rand(5, 5, seed=51)
    got = get_method("nearswap").merge(_inputs([x], base=b, t=0.3))
    B, X = _np(b), _np(x)
    w = np.clip(0.3 / np.abs(B - X), 0, 1)
    _close(got, w * X + (1 - w) * B)
    # t = 0 keeps the base, a huge t takes the other model
    assert torch.equal(get_method("nearswap").merge(_inputs([x], base=b, t=0.0)), b)
    assert torch.equal(get_method("nearswap").merge(_inputs([x], base=b, t=1e9)), x)


# ------------------------------------------------------------------ multislerp
def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    xs = [np.asarray(x, np.float64).ravel() for x in xs]
    if base is not None:
        b = np.asarray(base, np.float64).ravel()
        xs = [x - b for x in xs]
    w = np.asarray(w, np.float64)
    if normalize:
        w = w / w.sum()
    norms = [math.sqrt(float(x @ x)) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    mn = math.sqrt(float(m @ m))
    if mn < eps:
        r = sum(wi * x for wi, x in zip(w, xs))
    else:
        m = m / mn
        tangent = sum(wi * (u - float(u @ m) * m) for wi, u in zip(w, units))
        tn = math.sqrt(float(tangent @ tangent)) + eps
        r = m * math.cos(tn) + tangent * math.sin(tn) / tn
        r = r * sum(wi * n for wi, n in zip(w, norms))
    return r if base is None else r + b


def _multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    return get_method("multislerp").merge(
        _inputs(xs, [{"weight": v} for v in w], base=base, normalize_weights=normalize, eps=eps)
    )


def test_multislerp_three_vectors():
    xs = [_rand(4, 5, seed=60 + i) for i in range(3)]
    w = [0.2, 0.5, 0.3]
    _close(_multislerp(xs, w), ref_multislerp([_np(x) for x in xs], w).reshape(4, 5))
    base = _rand(4, 5, seed=70)
    _close(_multislerp(xs, w, base=base), ref_multislerp([_np(x) for x in xs], w, base=_np(base)).reshape(4, 5))
    _close(
        _multislerp(xs, [1, 2, 3], normalize=False),
        ref_multislerp([_np(x) for x in xs], [1, 2, 3], normalize=False).reshape(4, 5),
    )


def test_multislerp_by_hand_and_edge_cases():
    # orthogonal unit-norm vectors, equal weights: the midpoint direction, norm 1
    got = _multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1, 1])
    _close(got, [1 / math.sqrt(2), 1 / math.sqrt(2)])
    v = torch.tensor([1.0, -2.0, 0.5])
    # antipodal, two or three inputs: linear combination, never an error or NaN
    _close(_multislerp([v, -v], [1, 1]), [0, 0, 0], atol=1e-7)
    got = _multislerp([v, -v, v.clone(), -v.clone()], [1, 1, 1, 1])
    _close(got, [0, 0, 0], atol=1e-7)
    # zero vectors
    assert torch.equal(_multislerp([torch.zeros(3), torch.zeros(3)], [1, 1]), torch.zeros(3))
    _close(_multislerp([v, torch.zeros(3)], [1, 1]), 0.5 * _np(v))
    # weights summing to zero are used unnormalized
    got = _multislerp([v, 2 * v], [1, -1])
    assert torch.isfinite(got).all()
    # one input is returned as is
    assert torch.equal(_multislerp([v], [0.3]), v)


# ------------------------------------------------------------------ karcher
def _karcher(xs, max_iter=10, tol=1e-5):
    return get_method("karcher").merge(_inputs(xs, max_iter=max_iter, tol=tol))


def test_karcher_of_two_is_slerp_midpoint_of_directions_with_mean_norm():
    a, b = _rand(5, 3, seed=80), 3 * _rand(5, 3, seed=81)
    got = _karcher([a, b])
    A, B = _np(a).ravel(), _np(b).ravel()
    na, nb = np.linalg.norm(A), np.linalg.norm(B)
    direction = ref_slerp(0.5, A / na, B / nb)
    expected = (na + nb) / 2 * direction / np.linalg.norm(direction)
    _close(got, expected.reshape(5, 3))


def test_karcher_of_three_satisfies_the_first_order_condition():
    xs = [_rand(20, seed=90 + i) + 0.5 for i in range(3)]
    got = _np(_karcher(xs, max_iter=100, tol=1e-7))
    norms = [np.linalg.norm(_np(x)) for x in xs]
    assert abs(np.linalg.norm(got) - sum(norms) / 3) < 1e-4
    u = got / np.linalg.norm(got)
    # sum of log maps log_u(u_i) = theta_i / sin(theta_i) (u_i - cos(theta_i) u) vanishes
    grad = np.zeros_like(u)
    for x, n in zip(xs, norms):
        ui = _np(x) / n
        c = float(np.clip(u @ ui, -1, 1))
        th = math.acos(c)
        grad += th / math.sin(th) * (ui - c * u)
    assert np.linalg.norm(grad) < 1e-4


def test_karcher_edge_cases():
    v = torch.tensor([1.0, 2.0, 2.0])
    # antipodal: the mean direction is not unique; the arithmetic mean
    _close(_karcher([v, -v]), [0, 0, 0], atol=1e-7)
    _close(_karcher([v, -3 * v]), -_np(v))
    # all zero
    assert torch.equal(_karcher([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    # a zero input counts in the norm but not the direction: direction of v, norm |v|/2
    _close(_karcher([v, torch.zeros(3)]), 0.5 * _np(v))
    # identical inputs
    _close(_karcher([v, v.clone(), v.clone()]), _np(v))


# ------------------------------------------------------------------ sce
def ref_sce(base, xs, topk):
    """Loops over positions: select by variance, energy weights, unweighted sign election."""
    B = np.asarray(base, np.float64).ravel()
    D = [np.asarray(x, np.float64).ravel() - B for x in xs]
    n, size = len(D), B.size
    if topk < 1 and n >= 2:
        var = [float(np.var([d[p] for d in D])) for p in range(size)]
        k = int(topk * sum(1 for v in var if v != 0))
        order = sorted(range(size), key=lambda p: (-var[p], p))
        keep = set(order[:k])
        D = [np.array([d[p] if p in keep else 0.0 for p in range(size)]) for d in D]
    energy = [float(np.mean(d * d)) for d in D]
    total = sum(energy)
    w = [e / total for e in energy] if total > 0 else [1 / n] * n
    out = np.empty(size)
    for p in range(size):
        sigma = 1 if sum(d[p] for d in D) >= 0 else -1
        num = sum(wi * d[p] for wi, d in zip(w, D) if np.sign(d[p]) == sigma)
        den = sum(wi for wi, d in zip(w, D) if np.sign(d[p]) == sigma)
        out[p] = B[p] + (num / den if den > 0 else 0.0)
    return out


def _sce(xs, base, topk=1.0):
    return get_method("sce").merge(_inputs(xs, base=base, select_topk=topk, int8_mask=False))


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.25])
def test_sce_matches_reference(topk):
    base = _rand(6, 7, seed=100)
    xs = [base + _rand(6, 7, seed=101 + i) * (0.5 + i) for i in range(3)]
    got = _sce(xs, base, topk)
    _close(got, ref_sce(_np(base), [_np(x) for x in xs], topk).reshape(6, 7))


def test_sce_topk_by_variance_by_hand():
    base = torch.zeros(4)
    x1 = torch.tensor([1.0, 1.0, 3.0, -2.0])
    x2 = torch.tensor([1.0, 2.0, -3.0, 2.0])
    # variances: 0, .25, 9, 4 -> three nonzero; topk 0.67 -> k = 2: positions 2 and 3 survive
    got = _sce([x1, x2], base, 0.67)
    # energies after selection: (9+4)/4 each -> equal weights; position 2 sum 0 -> +1 wins: 3;
    # position 3 sum 0 -> +1: x2's 2
    _close(got, [0, 0, 3.0, 2.0])
    # topk 0: base
    assert torch.equal(_sce([x1, x2], base, 0.0), base)
    # a single model: no selection (its variance is zero everywhere)
    _close(_sce([x1], base, 0.5), _np(x1))
    # identical models are kept with topk 1
    _close(_sce([x1, x1.clone()], base, 1.0), _np(x1))
    # equal variances: ties broken by position, exactly k kept
    y1, y2 = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([-1.0, -1.0, -1.0, -1.0])
    got = _sce([y1, y2], base, 0.5)
    assert int((got != 0).sum()) == 2 and torch.equal(got[2:], torch.zeros(2))


def test_sce_weights_by_energy():
    base = torch.zeros(2)
    x1, x2 = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    # energies 1 and 9: weights .1 and .9
    _close(_sce([x1, x2], base), [0.1 * 1 + 0.9 * 3] * 2)


# ------------------------------------------------------------------ arcee_fusion
def ref_arcee_fusion(base, other):
    B, X = np.asarray(base, np.float64), np.asarray(other, np.float64)

    def softmax(a):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(X) + 1e-8, softmax(B) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    imp = np.abs(X - B) * kl
    s = sorted(imp.ravel())
    n = len(s)
    tau = s[(n - 1) // 2] + 1.5 * (s[int(0.75 * (n - 1))] - s[int(0.25 * (n - 1))])
    return np.where(imp >= tau, X, B), imp >= tau, imp, tau


def _check_arcee(got, base, other):
    """Exact picks, except that elements within float32 rounding of the threshold may go either way."""
    expected, mask, imp, tau = ref_arcee_fusion(base, other)
    got = got.double().numpy()
    near = np.abs(imp - tau) <= 1e-4 * abs(tau)
    assert near.sum() <= max(1, imp.size // 1000)
    assert np.array_equal(got[~near], expected[~near])
    assert np.all((got[near] == base[near]) | (got[near] == other[near]))
    return mask


def test_arcee_fusion_matches_reference():
    base = _rand(8, 16, seed=110)
    other = base + 0.1 * _rand(8, 16, seed=111) ** 3  # heavy-tailed changes: a few outliers
    got = get_method("arcee_fusion").merge(_inputs([other], base=base))
    mask = _check_arcee(got, _np(base), _np(other))
    assert 0 < mask.sum() < mask.size  # a real selection
    b1, o1 = _rand(33, seed=113), _rand(33, seed=114)
    _check_arcee(get_method("arcee_fusion").merge(_inputs([o1], base=b1)), _np(b1), _np(o1))
    # identical models: the base
    assert torch.equal(get_method("arcee_fusion").merge(_inputs([base.clone()], base=base)), base)


# ------------------------------------------------------------------ every method
GEOMETRIC = {
    "slerp": dict(t=0.5, nuslerp_flatten=True, nuslerp_row_wise=False),
    "multislerp": dict(normalize_weights=True, eps=1e-8),
    "karcher": dict(max_iter=10, tol=1e-5),
    "model_stock": dict(filter_wise=False),
    "nearswap": dict(t=0.01),
    "sce": dict(select_topk=0.5, int8_mask=False),
    "arcee_fusion": dict(),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_no_other_models_returns_base_and_bf16_in_out(name):
    base = _rand(6, 4, seed=120).bfloat16()
    got = get_method(name).merge(_inputs([], [], base=base, out_dtype=torch.bfloat16, **GEOMETRIC[name]))
    assert torch.equal(got, base)
    n = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1}.get(name, 2)
    xs = [(base.float() + 0.1 * _rand(6, 4, seed=121 + i)).bfloat16() for i in range(n)]
    mp = [{"weight": 1.0} for _ in xs]
    b = None if name == "karcher" else base
    out = torch.empty(6, 4, dtype=torch.bfloat16)
    got = get_method(name).merge(_inputs(xs, mp, base=b, out_dtype=torch.bfloat16, out=out, **GEOMETRIC[name]))
    assert got.dtype == torch.bfloat16 and got.shape == (6, 4) and torch.isfinite(got.float()).all()
    assert got.data_ptr() == out.data_ptr()
    f32 = get_method(name).merge(
        _inputs([x.float() for x in xs], mp, base=None if b is None else b.float(), **GEOMETRIC[name])
    )
    torch.testing.assert_close(got.float(), f32.bfloat16().float(), atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_integer_tensors_are_copied(name):
    ids = torch.arange(10).view(1, 10)
    n = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1}.get(name, 2)
    got = get_method(name).merge(
        _inputs(
            [ids.clone() for _ in range(n)], [{"weight": 1.0}] * n, base=ids, out_dtype=torch.int64, **GEOMETRIC[name]
        )
    )
    assert torch.equal(got, ids)


@pytest.mark.parametrize(
    "method,models,params,base,global_params,match",
    [
        ("model_stock", ["ft1"], None, True, None, "at least 2"),
        ("model_stock", ["ft1", "ft2"], None, False, None, "needs a base_model"),
        ("model_stock", ["ft1", "ft2"], None, True, "{filter_wise: 2}", "true or false"),
        ("nearswap", ["ft1"], None, True, None, "needs parameter 't'"),
        ("nearswap", ["ft1"], None, True, "{t: -1}", "'t' must be >= 0"),
        ("nearswap", ["ft1", "ft2"], None, True, "{t: 0.1}", "at most 1"),
        ("multislerp", ["ft1", "ft2"], {"ft1": "{weight: 1}"}, False, None, "needs parameter 'weight'"),
        (
            "multislerp",
            ["ft1", "ft2"],
            {"ft1": "{weight: 1}", "ft2": "{weight: 1}"},
            False,
            "{eps: -1}",
            "'eps' must be >= 0",
        ),
        ("karcher", ["ft1", "ft2"], None, False, "{max_iter: 2.5}", "integer"),
        ("karcher", ["ft1", "ft2"], None, False, "{max_iters: 5}", "did you mean 'max_iter'"),
        ("sce", ["ft1", "ft2"], None, True, "{select_topk: 1.5}", "'select_topk' must be <= 1"),
        ("sce", ["ft1", "ft2"], None, False, None, "needs a base_model"),
        ("arcee_fusion", ["ft1", "ft2"], None, True, None, "at most 1"),
        ("arcee_fusion", ["ft1"], None, False, None, "needs a base_model"),
    ],
)
def test_bad_configs_fail_at_plan_time(llama, method, models, params, base, global_params, match):
    with pytest.raises(ConfigError, match=match):
        # strict: a misspelt parameter is otherwise ignored with a warning, as mergekit ignores it
        plan_merge(_config(llama, method, models, params, base, global_params), strict=True)


def _ref_tensors(fixture, keys):
    return [read_state(fixture[k]) for k in keys]


@pytest.mark.slow
def test_e2e_model_stock(llama, tmp_path, write_yaml):
    got = _merge(write_yaml, tmp_path, _config(llama, "model_stock", ["ft1", "ft2", "ft3"]) + "dtype: float32\n")
    b, *xs = _ref_tensors(llama, ("base", "ft1", "ft2", "ft3"))
    for k in KEYS:
        t = ref_model_stock_t([(_np(x[k]) - _np(b[k])).ravel() for x in xs])
        _close(got[k], t * sum(_np(x[k]) for x in xs) / 3 + (1 - t) * _np(b[k]))


@pytest.mark.slow
def test_e2e_nearswap_tied_embeddings(qwen2, tmp_path, write_yaml):
    got = _merge(write_yaml, tmp_path, _config(qwen2, "nearswap", ["ft1"], global_params="{t: 0.01}"))
    assert "lm_head.weight" not in got
    b, x = _ref_tensors(qwen2, ("base", "ft1"))
    for k in (*KEYS, "model.embed_tokens.weight"):
        B, X = _np(b[k]), _np(x[k])
        with np.errstate(divide="ignore"):
            w = np.where(B == X, 1.0, np.clip(0.01 / np.abs(B - X), 0, 1))
        _close(got[k], w * X + (1 - w) * B)


@pytest.mark.slow
def test_e2e_multislerp_with_base(mistral, tmp_path, write_yaml):
    text = _config(
        mistral, "multislerp", ["ft1", "ft2", "ft3"], {"ft1": "{weight: 1}", "ft2": "{weight: 2}", "ft3": "{weight: 1}"}
    )
    got = _merge(write_yaml, tmp_path, text + "dtype: float32\n")
    b, *xs = _ref_tensors(mistral, ("base", "ft1", "ft2", "ft3"))
    for k in KEYS:
        _close(got[k], ref_multislerp([_np(x[k]) for x in xs], [1, 2, 1], base=_np(b[k])).reshape(b[k].shape))


@pytest.mark.slow
def test_e2e_karcher(qwen2, tmp_path, write_yaml):
    # per-model weights (which karcher does not use) only warn: mergekit configs carry them
    text = _config(qwen2, "karcher", ["ft1", "ft2"], {"ft1": "{weight: 1}", "ft2": "{weight: 1}"}, base=False)
    got = _merge(write_yaml, tmp_path, text + "dtype: float32\n")
    x1, x2 = _ref_tensors(qwen2, ("ft1", "ft2"))
    for k in KEYS:
        A, B = _np(x1[k]).ravel(), _np(x2[k]).ravel()
        na, nb = np.linalg.norm(A), np.linalg.norm(B)
        d = ref_slerp(0.5, A / na, B / nb)
        _close(got[k], ((na + nb) / 2 * d / np.linalg.norm(d)).reshape(x1[k].shape))


# the geometric methods' end-to-end merge in the fast selection (the others are slow)
def test_e2e_sce(llama, tmp_path, write_yaml):
    got = _merge(
        write_yaml,
        tmp_path,
        _config(llama, "sce", ["ft1", "ft2", "ft3"], global_params="{select_topk: 0.5}") + "dtype: float32\n",
    )
    b, *xs = _ref_tensors(llama, ("base", "ft1", "ft2", "ft3"))
    for k in ("model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        _close(got[k], ref_sce(_np(b[k]), [_np(x[k]) for x in xs], 0.5).reshape(b[k].shape))


@pytest.mark.slow
def test_e2e_arcee_fusion(llama, tmp_path, write_yaml):
    got = _merge(write_yaml, tmp_path, _config(llama, "arcee_fusion", ["ft1"]) + "dtype: float32\n")
    b, x = _ref_tensors(llama, ("base", "ft1"))
    for k in KEYS:
        _check_arcee(got[k], _np(b[k]), _np(x[k]))
