"""Each method against an independent, straightforward torch computation of its formula."""

import pytest
import torch

from mergekitty.methods.base import MergeInputs
from mergekitty.methods.registry import get_method


def _inputs(tensors, weights, base=None, out_dtype=torch.float32, **params):
    return MergeInputs(
        name="model.layers.0.mlp.up_proj.weight",
        tensors=tensors,
        model_params=[{"weight": w} for w in weights],
        params=params,
        base=base,
        out_dtype=out_dtype,
    )


@pytest.fixture
def xs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(37, 29, generator=g) for _ in range(3)]


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_weighted_average(xs, normalize):
    w = [0.5, 0.3, 0.7]
    got = get_method("linear").merge(_inputs(xs, w, normalize=normalize))
    expected = sum(wi * x.double() for wi, x in zip(w, xs))
    if normalize:
        expected = expected / sum(w)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def test_linear_zero_sum_weights_are_not_nan(xs):
    got = get_method("linear").merge(_inputs(xs[:2], [1.0, -1.0], normalize=True))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, xs[0] - xs[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision_inputs_accumulate_in_float32(xs, dtype):
    halves = [x.to(dtype) for x in xs]
    got = get_method("linear").merge(_inputs(halves, [1, 1, 1], out_dtype=dtype, normalize=True))
    expected = (sum(x.double() for x in halves) / 3).to(dtype)
    assert got.dtype == dtype
    # float32 accumulation then one rounding: at most one unit in the last place away
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_task_arithmetic_matches_formula(xs, normalize, lam):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(37, 29, generator=g)
    w = [0.5, 0.3, 0.2]
    got = get_method("task_arithmetic").merge(_inputs(xs, w, base=base, normalize=normalize, **{"lambda": lam}))
    deltas = sum(wi * (x.double() - base.double()) for wi, x in zip(w, xs))
    if normalize:
        deltas = deltas / sum(w)
    expected = base.double() + lam * deltas
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_task_arithmetic_without_task_vectors_returns_base():
    base = torch.randn(5, 3)
    got = get_method("task_arithmetic").merge(_inputs([], [], base=base, normalize=False, **{"lambda": 1.0}))
    torch.testing.assert_close(got, base)


def test_passthrough_scale():
    x = torch.randn(8, 4)
    m = get_method("passthrough")
    same = m.merge(MergeInputs("t", [x], [{"scale": None}], {}, out_dtype=torch.float32))
    assert torch.equal(same, x)
    scaled = m.merge(MergeInputs("t", [x], [{"scale": 0.5}], {}, out_dtype=torch.float32))
    torch.testing.assert_close(scaled, x * 0.5)


def test_passthrough_keeps_integer_tensors():
    x = torch.arange(10, dtype=torch.int64)
    out = get_method("passthrough").merge(
        MergeInputs("position_ids", [x], [{"scale": None}], {}, out_dtype=torch.int64)
    )
    assert out.dtype == torch.int64 and torch.equal(out, x)
