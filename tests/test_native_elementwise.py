"""The native NearSwap, SCE and Arcee Fusion kernels (``_native.nearswap_merge``, ``sce_merge``,
``arcee_fusion_merge``) against the torch references (``MergeMethod.merge``, methods/nearswap.py,
sce.py, arcee_fusion.py), on raw little-endian bytes (bf16 crosses as bytes: numpy has none).

- nearswap: bit-identical (the same float32 operations).
- arcee_fusion: bit-identical on these tensors. The row KL is float64 in both but summed in
  another order and with other exp/ln (~1e-15 absolute apart), so in general an element whose
  importance lies within that of tau may differ; the test allows that and nothing else.
- sce: the selection is bit-identical; the weights differ in their last bits (torch sums
  mean(d^2) in float32 in its own order, the kernel in float64), so the output is within
  SCE_ULPS[dtype] units in the last place of the output dtype, taken at max(|out|, |base|,
  |merged|): measured at most 4 (F32) and 1 (BF16, F16), in 2.5% (F32) and < 0.002% (BF16,
  F16) of the elements.

Every call also returns health figures, checked against a float64 torch computation, and the
bytes do not depend on the thread count.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers import task_vector_family  # noqa: E402

_native = pytest.importorskip("mergekitty._native")
if not hasattr(_native, "sce_merge"):
    pytest.skip("native module built without the method kernels", allow_module_level=True)

from mergekitty.errors import InvalidArgumentError  # noqa: E402
from mergekitty.methods.arcee_fusion import order_statistic, row_kl  # noqa: E402
from mergekitty.methods.base import MergeInputs  # noqa: E402
from mergekitty.methods.registry import get_method  # noqa: E402
from mergekitty.ops.reduce import bytes_view  # noqa: E402

CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES = list(CODES)
SHAPES = [(1,), (7,), (4096,), (13, 257), (64, 1031), (3, 5, 129)]
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
SCE_ULPS = {torch.float32: 8, torch.float16: 1, torch.bfloat16: 1}  # measured: 4, 1, 1


def models(shape, dtype, k=1, seed=0, specials=False):
    """A weight-like base (N(0, 0.02)) and ``k`` fine-tunes (+ N(0, 0.002)), as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = [(base + torch.randn(shape, generator=g) * 0.002).to(dtype) for _ in range(k)]
    base = base.to(dtype)
    if specials and base.numel() > 40:
        base.view(-1)[3] = float("nan")
        xs[0].view(-1)[11] = float("inf")
        xs[-1].view(-1)[29] = float("-inf")
    return base, xs


def reference(method, base, xs, params, out_dtype):
    inputs = MergeInputs("model.layers.0.w", list(xs), [{}] * len(xs), params, base=base, out_dtype=out_dtype)
    return get_method(method).merge(inputs).to(out_dtype)


def native(method, base, xs, params, out_dtype, threads=2):
    """The kernel's output tensor and its TensorHealth."""
    out = torch.empty(base.shape, dtype=out_dtype)
    b, o = bytes_view(base), bytes_view(out)
    bc, oc = CODES[base.dtype], CODES[out_dtype]
    if method == "nearswap":
        x = xs[0]
        h = _native.nearswap_merge(b, bc, bytes_view(x), CODES[x.dtype], params["t"], o, oc, threads)
    elif method == "sce":
        codes = [CODES[x.dtype] for x in xs]
        h = _native.sce_merge(b, bc, [bytes_view(x) for x in xs], codes, params["select_topk"], o, oc, threads)
    else:
        x = xs[0]
        row_len = base.shape[-1] if base.dim() else 1
        h = _native.arcee_fusion_merge(b, bc, bytes_view(x), CODES[x.dtype], row_len, o, oc, threads)
    return out, h


def assert_bits_equal(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.float().reshape(-1), want.float().reshape(-1)
    bad = ~((g == w) | (g.isnan() & w.isnan()))
    if got.dtype == torch.float32:  # the sign of zero too
        bad |= (g == 0) & (torch.signbit(g) != torch.signbit(w))
    assert not bad.any(), f"{int(bad.sum())} mismatches, first at {bad.nonzero()[:5].flatten().tolist()}"


def figures(t):
    f = t.double().reshape(-1)
    finite = f.isfinite()
    return int((~finite).sum()), float((f[finite] ** 2).sum())


def assert_health(h, inputs, out):
    want = [figures(t) for t in inputs]
    assert list(h.input_nonfinite) == [n for n, _ in want]
    torch.testing.assert_close(list(h.input_sumsq), [s for _, s in want], rtol=1e-5, atol=1e-30)
    n, s = figures(out)
    assert h.output_nonfinite == n
    torch.testing.assert_close(h.output_sumsq, s, rtol=1e-5, atol=1e-30)


def assert_threads_agree(method, base, xs, params, out_dtype, got):
    one, _ = native(method, base, xs, params, out_dtype, threads=1)
    assert torch.equal(one.view(torch.uint8), got.view(torch.uint8))


# ---------------------------------------------------------------------------------------
# NearSwap
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_is_bit_identical(shape, dtype):
    base, xs = models(shape, dtype, seed=len(shape))
    for t in (0.0, 1e-3, 0.5):
        params = {"t": t}
        got, h = native("nearswap", base, xs, params, dtype)
        assert_bits_equal(got, reference("nearswap", base, xs, params, dtype))
        assert_health(h, [base, *xs], got)
    assert_threads_agree("nearswap", base, xs, params, dtype, got)


def test_nearswap_nan_inf_and_mixed_dtypes():
    base, xs = models((37, 41), torch.bfloat16, specials=True)
    x = xs[0].float()
    x.view(-1)[100] = float("nan")
    for out_dtype in DTYPES:
        got, h = native("nearswap", base, [x], {"t": 1e-3}, out_dtype)
        assert_bits_equal(got, reference("nearswap", base, [x], {"t": 1e-3}, out_dtype))
        assert_health(h, [base, x], got)
        assert h.input_nonfinite == [1, 3]


# ---------------------------------------------------------------------------------------
# SCE
# ---------------------------------------------------------------------------------------


def assert_sce_close(got, want, base):
    """Within SCE_ULPS units in the last place of the output dtype, taken at the magnitude of
    the larger of the output, the base and the merged delta (the final add rounds there)."""
    g, w, b = got.float().reshape(-1), want.float().reshape(-1), base.float().reshape(-1)
    nan = g.isnan() | w.isnan()
    assert torch.equal(g.isnan(), w.isnan()), "NaN positions differ"
    inf = g.isinf() | w.isinf()
    assert torch.equal(g[inf], w[inf]), "Inf positions differ"
    ok = ~(nan | inf)
    g, w, b = g[ok], w[ok], b[ok]
    mag = torch.maximum(torch.maximum(w.abs(), b.abs().nan_to_num(0, 0, 0)), (w - b).abs().nan_to_num(0, 0, 0))
    p = MANTISSA[got.dtype]
    ulp = torch.pow(2.0, torch.floor(torch.log2(torch.clamp(mag, min=2.0**-126))) - p)
    ulps = ((g - w).abs() / ulp).max().item() if g.numel() else 0.0
    assert ulps <= SCE_ULPS[got.dtype], f"{ulps} ulp"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sce_matches_the_reference(shape, dtype):
    base, xs = models(shape, dtype, k=3, seed=3 + len(shape))
    for k in (1, 2, 3):
        for topk in (1.0, 0.5, 0.1, 0.0):
            params = {"select_topk": topk}
            got, h = native("sce", base, xs[:k], params, dtype)
            assert_sce_close(got, reference("sce", base, xs[:k], params, dtype), base)
            assert_health(h, [base, *xs[:k]], got)
    assert_threads_agree("sce", base, xs, params, dtype, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sce_selection_with_ties_is_the_reference_selection(dtype):
    """Many tied variances at the k-th value (exact zeros and repeated task-vector entries): the
    kept positions, where the result leaves the base, are exactly the reference's."""
    base, xs = task_vector_family((97, 1031), dtype, k=3, seed=5)
    for topk in (0.5, 0.3, 1e-4):
        params = {"select_topk": topk}
        got, _ = native("sce", base, xs, params, dtype)
        want = reference("sce", base, xs, params, dtype)
        assert torch.equal(got != base, want != base)
        assert_sce_close(got, want, base)


def test_sce_nan_inf_and_mixed_dtypes():
    base, xs = models((29, 67), torch.bfloat16, k=3, specials=True)
    xs[1] = xs[1].to(torch.float16)
    xs[2] = xs[2].float()
    for topk in (1.0, 0.5):
        for out_dtype in DTYPES:
            params = {"select_topk": topk}
            got, h = native("sce", base, xs, params, out_dtype)
            assert_sce_close(got, reference("sce", base, xs, params, out_dtype), base)
            assert_health(h, [base, *xs], got)
            assert h.input_nonfinite == [1, 1, 0, 1]


# ---------------------------------------------------------------------------------------
# Arcee Fusion
# ---------------------------------------------------------------------------------------


def assert_arcee_close(got, want, base, x):
    """Identical, except where the reference's importance is within float32 rounding of the KL
    (4 ulp) of tau."""
    diff = ~((got.float() == want.float()) | (got.float().isnan() & want.float().isnan()))
    if not diff.any():
        return
    b, xf = base.float(), x.float()
    imp = (xf - b).abs() * row_kl(xf, b)
    flat = imp.reshape(-1)
    n = flat.numel()
    median = order_statistic(flat, (n - 1) // 2)
    tau = median + 1.5 * (order_statistic(flat, int(0.75 * (n - 1))) - order_statistic(flat, int(0.25 * (n - 1))))
    near = (imp - tau).abs() <= 4 * torch.finfo(torch.float32).eps * tau.abs()
    assert not (diff & ~near).any(), f"{int((diff & ~near).sum())} elements differ away from tau"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_matches_the_reference(shape, dtype):
    base, xs = models(shape, dtype, seed=7 + len(shape))
    got, h = native("arcee_fusion", base, xs, {}, dtype)
    assert_arcee_close(got, reference("arcee_fusion", base, xs, {}, dtype), base, xs[0])
    assert_health(h, [base, *xs], got)
    assert_threads_agree("arcee_fusion", base, xs, {}, dtype, got)


def test_arcee_fusion_rows_of_unequal_kl_and_long_rows():
    """Rows scaled differently (KLs over orders of magnitude), and rows past the kernel's
    cached length (recomputed exponentials)."""
    for shape in ((16, 300), (2, 40_000), (70_001,)):
        base, xs = models(shape, torch.float32, seed=11)
        if len(shape) == 2:
            scale = torch.logspace(-1, 1.5, shape[0]).unsqueeze(1)
            base, xs = base * scale, [xs[0] * scale]
        got, _ = native("arcee_fusion", base, xs, {}, torch.float32)
        assert_arcee_close(got, reference("arcee_fusion", base, xs, {}, torch.float32), base, xs[0])


def test_arcee_fusion_constant_tensors_and_nan_rows():
    base = torch.full((8, 64), 0.5)
    for x in (base.clone(), base + 0.25):  # p == q: KL 0, every importance 0 == tau
        got, _ = native("arcee_fusion", base, [x], {}, torch.float32)
        assert_bits_equal(got, reference("arcee_fusion", base, [x], {}, torch.float32))
        assert torch.equal(got, x)
    base, xs = models((8, 64), torch.bfloat16, specials=True)
    for out_dtype in DTYPES:
        got, h = native("arcee_fusion", base, xs, {}, out_dtype)
        assert_arcee_close(got, reference("arcee_fusion", base, xs, {}, out_dtype), base, xs[0])
        assert_health(h, [base, *xs], got)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def test_bad_arguments_are_clear_errors():
    base, xs = models((4, 8), torch.float32)
    out = torch.empty((4, 8))
    b, x, o = bytes_view(base), bytes_view(xs[0]), bytes_view(out)
    short = bytes_view(torch.zeros(31))
    with pytest.raises(InvalidArgumentError, match=r"other \(F32\) has 124 bytes, expected 128"):
        _native.nearswap_merge(b, "F32", short, "F32", 0.1, o, "F32")
    with pytest.raises(InvalidArgumentError, match="t is NaN"):
        _native.nearswap_merge(b, "F32", x, "F32", float("nan"), o, "F32")
    with pytest.raises(InvalidArgumentError, match=r"inputs\[1\] \(F32\) has 124 bytes"):
        _native.sce_merge(b, "F32", [x, short], ["F32", "F32"], 0.5, o, "F32")
    with pytest.raises(InvalidArgumentError, match="2 inputs but 1 dtypes"):
        _native.sce_merge(b, "F32", [x, x], ["F32"], 0.5, o, "F32")
    with pytest.raises(InvalidArgumentError, match="row length 3 does not divide the 32 elements"):
        _native.arcee_fusion_merge(b, "F32", x, "F32", 3, o, "F32")
    with pytest.raises(InvalidArgumentError, match="I8"):
        _native.arcee_fusion_merge(b, "F32", x, "I8", 8, o, "F32")
    with pytest.raises(InvalidArgumentError, match="overlaps"):
        _native.nearswap_merge(b, "F32", x, "F32", 0.1, b, "F32")
