"""Each merge method's native CPU function (``TorchFunction.native``, as the executor calls it on
raw bytes) against its torch function, the reference.

Geometric methods (slerp/nuslerp, multislerp, karcher, model_stock): the native path reads exact
float64 inner products and writes ``sum_i c_i x_i`` in float32; the torch functions compute the
same formulas on float32 tensors. Documented tolerance: the two agree to a few float32 roundings
of the output scale (``TOL`` of the largest magnitude) and every health figure to float32
rounding. The elementwise methods' kernels (nearswap, sce, arcee_fusion) are tested bit for bit
on raw buffers in test_native_elementwise.py; here, through ``native``, within the same ``TOL``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekitty.methods import arcee_fusion, karcher, model_stock, multislerp, nearswap, sce, slerp
from mergekitty.methods.base import MergeInputs, MergeMethod, NativeInputs

TOL = 2e-6  # of max |reference|: a few float32 roundings

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def run_both(
    method: MergeMethod,
    tensors: list[torch.Tensor],
    params: dict,
    model_params: list[dict] | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(native result, torch reference, native health), both as float32."""
    mps = model_params or [{} for _ in tensors]
    ref = method.merge(
        MergeInputs(name="w", tensors=tensors, model_params=mps, params=params, base=base, out_dtype=torch.float32)
    )
    inputs = ([base] if base is not None else []) + tensors
    shape = tuple(tensors[0].shape)
    out = np.zeros(math.prod(shape), dtype=np.float32)
    code = {v: k for k, v in DTYPES.items()}
    native = method.compute.native  # type: ignore[union-attr]
    assert native is not None
    health = native(
        NativeInputs(
            name="w",
            inputs=[raw(t) for t in inputs],
            dtypes=[code[t.dtype] for t in inputs],
            has_base=base is not None,
            shape=shape,
            params=params,
            model_params=mps,
            out=out.view(np.uint8),
            out_dtype="F32",
            threads=2,
        )
    )
    return torch.from_numpy(out).reshape(shape), ref, health


def assert_close(native: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max()) or 1.0
    err = float((native - ref).abs().max())
    assert err <= TOL * scale, f"max error {err:.3g} over scale {scale:.3g}"


def family(shape, n: int, dtype: torch.dtype, spread: float = 0.1, seed: int = 0):
    """A base and ``n`` fine-tunes of it (``spread`` relative)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(base + spread * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


SHAPES = [(64, 48), (300,), (3, 5, 9)]
SLERP_MODES = {
    "t": dict(t=0.3, nuslerp_flatten=True, nuslerp_row_wise=False),
    "t-rows": dict(t=0.7, nuslerp_flatten=False, nuslerp_row_wise=True),
    "nuslerp": dict(t=None, nuslerp_flatten=True, nuslerp_row_wise=False),
    "nuslerp-rows": dict(t=None, nuslerp_flatten=False, nuslerp_row_wise=True),
    "nuslerp-columns": dict(t=None, nuslerp_flatten=False, nuslerp_row_wise=False),
}


@pytest.mark.parametrize("code", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "mode,with_base", [(m, b) for m in SLERP_MODES for b in (True, False) if b or SLERP_MODES[m]["t"] is None]
)
def test_slerp_matches_the_torch_function(code, shape, mode, with_base):
    params = SLERP_MODES[mode]
    base, xs = family(shape, 1 if params["t"] is not None else 2, DTYPES[code])
    mps = [{"weight": 1.0}, {"weight": 3.0}][: len(xs)]
    native, ref, health = run_both(slerp.METHOD, xs, params, mps, base if with_base else None)
    assert_close(native, ref)
    inputs = ([base] if with_base else []) + xs
    for got, t in zip(health.input_sumsq, inputs):
        assert got == pytest.approx(float(t.double().pow(2).sum()), rel=1e-6)
    assert health.output_sumsq == pytest.approx(float(native.double().pow(2).sum()), rel=1e-6)


def test_slerp_degenerate_vectors_take_the_lerp():
    """Zero, parallel and antipodal vectors: the native decisions are the torch function's."""
    a = torch.randn(4, 32)
    b = a.clone()
    b[0] = 0.0  # a zero row
    b[1] = 2.0 * a[1]  # parallel
    b[2] = -a[2]  # antipodal
    params = dict(t=0.25, nuslerp_flatten=False, nuslerp_row_wise=True)
    native, ref, _ = run_both(slerp.METHOD, [b], params, [{}], a)
    assert_close(native, ref)
    assert torch.allclose(native[1], 0.75 * a[1] + 0.25 * b[1], atol=1e-6)


@pytest.mark.parametrize("code", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_multislerp_matches_the_torch_function(code, with_base, n):
    base, xs = family((48, 40), n, DTYPES[code], spread=0.5)
    mps = [{"weight": w} for w in (1.0, 2.0, 0.5, 1.5)[:n]]
    params = {"normalize_weights": True, "eps": 1e-8}
    native, ref, _ = run_both(multislerp.METHOD, xs, params, mps, base if with_base else None)
    assert_close(native, ref)


def test_multislerp_cancelling_directions_take_the_linear_combination():
    x = torch.randn(100)
    params = {"normalize_weights": False, "eps": 1e-8}
    native, ref, _ = run_both(multislerp.METHOD, [x, -x], params, [{"weight": 1.0}, {"weight": 1.0}])
    assert_close(native, ref)
    assert float(native.abs().max()) == 0.0


@pytest.mark.parametrize("code", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_karcher_matches_the_torch_function(code, n):
    _, xs = family((40, 33), n, DTYPES[code], spread=0.8, seed=n)
    params = {"max_iter": 10, "tol": 1e-5}
    native, ref, _ = run_both(karcher.METHOD, xs, params)
    assert_close(native, ref)


def test_karcher_two_inputs_is_the_slerp_midpoint_of_directions():
    a, b = torch.randn(256), torch.randn(256)
    native, _, _ = run_both(karcher.METHOD, [a, b], {"max_iter": 50, "tol": 1e-9})
    ua, ub = a / a.norm(), b / b.norm()
    mid = (ua + ub) / (ua + ub).norm() * (a.norm() + b.norm()) / 2
    assert torch.allclose(native, mid, atol=1e-5)


def test_karcher_cancelling_or_zero_inputs_give_the_arithmetic_mean():
    x = torch.randn(64)
    for tensors in ([x, -x], [torch.zeros(64), torch.zeros(64)]):
        native, ref, _ = run_both(karcher.METHOD, tensors, {"max_iter": 10, "tol": 1e-5})
        assert_close(native, ref)


@pytest.mark.parametrize("code", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(32, 24), (50,)])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_matches_the_torch_function(code, filter_wise, shape, n):
    base, xs = family(shape, n, DTYPES[code], seed=3)
    native, ref, _ = run_both(model_stock.METHOD, xs, {"filter_wise": filter_wise}, None, base)
    assert_close(native, ref)


def test_model_stock_formula_by_hand():
    """t = N cos / (1 + (N-1) cos) from the task vectors' mean pairwise cosine."""
    base = torch.zeros(2)
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    native, _, _ = run_both(model_stock.METHOD, [x1, x2], {"filter_wise": False}, None, base)
    assert torch.allclose(native, t * (x1 + x2) / 2, atol=1e-7)


def test_base_alone_passes_through():
    base = torch.randn(10, 4).bfloat16()
    out = np.zeros(40, dtype=np.float32)
    native = slerp.METHOD.compute.native  # type: ignore[union-attr]
    params = SLERP_MODES["t"]
    native(NativeInputs("w", [raw(base)], ["BF16"], True, (10, 4), params, [], out.view(np.uint8), "F32"))
    assert torch.equal(torch.from_numpy(out).reshape(10, 4), base.float())


@pytest.mark.parametrize("code", DTYPES)
@pytest.mark.parametrize("shape", [(40, 33), (257,)])
@pytest.mark.parametrize(
    "method,params,n",
    [
        (nearswap.METHOD, {"t": 0.05}, 1),
        (sce.METHOD, {"select_topk": 0.4, "int8_mask": False}, 3),
        (sce.METHOD, {"select_topk": 1.0, "int8_mask": False}, 1),
        (arcee_fusion.METHOD, {}, 1),
    ],
)
def test_elementwise_methods_match_the_torch_function(code, shape, method, params, n):
    base, xs = family(shape, n, DTYPES[code], seed=11)
    native, ref, health = run_both(method, xs, params, None, base)
    assert_close(native, ref)
    for got, t in zip(health.input_sumsq, [base, *xs]):
        assert got == pytest.approx(float(t.double().pow(2).sum()), rel=1e-6)
