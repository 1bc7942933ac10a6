"""Native sparsify / consensus / random kernels against the torch references in ``ops/``.

Masks must be bit-identical; values exact (L1 rescale: same mask, scale within float32 sum
order; combine: within 1 ulp). Thread counts 1 and 2 must give identical bytes.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from helpers import task_vector_family  # noqa: E402

_native = pytest.importorskip("mergekitty._native")
if not hasattr(_native, "magnitude"):
    pytest.skip("native module built without the sparsify kernels", allow_module_level=True)

from mergekitty.errors import InvalidArgumentError, MergekittyError  # noqa: E402
from mergekitty.kernels import NO_SPARSITY, GtaSpec, Sparsity  # noqa: E402
from mergekitty.ops import consensus as C  # noqa: E402
from mergekitty.ops import native_dispatch as N  # noqa: E402
from mergekitty.ops import random as R  # noqa: E402
from mergekitty.ops import sparsify as S  # noqa: E402
from mergekitty.ops.reduce import bytes_view  # noqa: E402

SHAPES = [
    (),
    (0,),
    (1,),
    (2,),
    (7,),
    (1000,),
    (100003,),
    (0, 5),
    (1, 1),
    (2, 1),
    (7, 3),
    (3, 7),
    (10, 100),
    (1, 100003),
    (97, 1031),
]
DENSITIES = [0.0, 1e-9, 0.3, 0.5, 1.0]  # 1e-9: k = 1
KEY = "model.layers.3.mlp.up_proj.weight#1"


def data(shape, seed=0, ties=False, specials=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.01
    if ties:  # a few distinct magnitudes: many exact ties, and exact zeros
        x = torch.round(x * 300) / 300
    if specials and x.numel() > 10:
        f = x.view(-1)
        f[3], f[5], f[8] = float("nan"), float("inf"), float("-inf")
        f[9] = -0.0
    return x


def native(fn, x, *args, threads=2):
    w = x.float().clone().contiguous()
    fn(w.reshape(-1).numpy(), *args, threads)
    return w


def assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.reshape(-1), want.reshape(-1)
    both_nan = g.isnan() & w.isnan()
    bad = ~((g == w) | both_nan)
    assert not bad.any(), f"{int(bad.sum())} mismatches, first at {int(bad.nonzero()[0])}: {g[bad][:5]} vs {w[bad][:5]}"


def assert_same_mask_close(got, want, rtol=2e-6):
    assert_same(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0, equal_nan=True)


def ulps(a, b):
    def ordered(t):
        bits = t.contiguous().view(torch.int32).long()
        mag = bits & 0x7FFFFFFF
        return torch.where(bits < 0, -mag, mag)

    return (ordered(a.float()) - ordered(b.float())).abs().max().item() if a.numel() else 0


# ------------------------------------------------------------------ uniform
def test_uniform_matches_torch_across_2_32():
    for start in (0, 2**32 - 500_000, 5 * 2**32 + 17):
        out = torch.empty(1_000_000)
        _native.uniform(7, KEY, start, out.numpy())
        ref = R.uniform(7, KEY, 1_000_000, start=start)
        assert torch.equal(out, ref), start
    # spot checks against the plain-Python definition
    for i in (0, 1, 2**32, 2**32 + 5, 2**63 - 1):
        out = torch.empty(1)
        _native.uniform(42, KEY, i, out.numpy())
        assert out.item() == R.uniform_scalar(42, KEY, i)
    assert torch.equal(N.uniform(3, "k", 1000, start=2**40), R.uniform(3, "k", 1000, start=2**40))


def test_uniform_golden():
    # the same numbers as the Rust unit test (plain-Python implementation of docs/kernels.md)
    out = torch.empty(2)
    _native.uniform(42, KEY, 0, out.numpy())
    assert out.tolist() == [0.6520769596099854, 0.8660200238227844]


# ------------------------------------------------------------------ magnitude / outliers
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_parity(shape, ties):
    x = data(shape, seed=len(shape) + sum(shape), ties=ties, specials=True)
    for d in DENSITIES:
        want = S.magnitude_reference(x, d)
        for threads in (1, 2):
            assert_same(native(_native.magnitude, x, d, False, threads=threads), want)
        assert_same(S.magnitude(x, d), want)
        if not ties:
            xf = data(shape, seed=1)
            assert_same_mask_close(native(_native.magnitude, xf, d, True), S.magnitude_reference(xf, d, rescale=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_magnitude_outliers_parity(shape):
    for ties in (False, True):
        x = data(shape, seed=3, ties=ties, specials=True)
        for d in DENSITIES:
            for gamma in (0.0, 0.01, 0.1):
                want = S.magnitude_outliers_reference(x, d, gamma)
                for threads in (1, 2):
                    assert_same(native(_native.magnitude_outliers, x, d, gamma, False, threads=threads), want)
                assert_same(S.magnitude_outliers(x, d, gamma), want)
    xf = data(shape, seed=4)
    assert_same_mask_close(
        native(_native.magnitude_outliers, xf, 0.5, 0.05, True),
        S.magnitude_outliers_reference(xf, 0.5, 0.05, rescale=True),
    )


def test_breadcrumbs_small_tensor_not_zeroed():
    x = data((50,), seed=5)
    y = S.magnitude_outliers(x, 0.9, 0.01)
    assert int((y != 0).sum()) == 45
    assert y.abs().max() == x.abs().max()  # floor(0.01 * 50) = 0: nothing dropped from the top
    assert_same(y, S.magnitude_outliers_reference(x, 0.9, 0.01))


# ------------------------------------------------------------------ DARE
@pytest.mark.parametrize("shape", SHAPES)
def test_random_mask_parity(shape):
    x = data(shape, seed=6, specials=True)
    for d in DENSITIES:
        for mode in ("inverse", "none"):
            want = S.random_mask_reference(x, d, 11, KEY, mode)
            for threads in (1, 2):
                assert_same(native(_native.random_mask, x, d, 11, KEY, mode, threads=threads), want)
            assert_same(S.random_mask(x, d, 11, KEY, mode), want)
    xf = data(shape, seed=7)
    assert_same_mask_close(
        native(_native.random_mask, xf, 0.3, 11, KEY, "l1"), S.random_mask_reference(xf, 0.3, 11, KEY, "l1")
    )


def test_random_mask_kept_fraction():
    n = 1_000_000
    x = data((n,), seed=8)
    for d in (0.1, 0.5, 0.9):
        kept = int((S.random_mask(x, d, 3, "w#0") != 0).sum())
        assert abs(kept - n * d) < 4 * math.sqrt(n * d * (1 - d)), (d, kept)


def test_random_mask_rescale_preserves_expectation():
    x = data((1000,), seed=9) + 0.05  # no near-zero entries
    seeds = 400
    d = 0.3
    mean = sum(S.random_mask(x, d, s, "e#0") for s in range(seeds)) / seeds
    sd = x.abs() * math.sqrt((1 - d) / d / seeds)
    assert ((mean - x).abs() / sd).max() < 5


# ------------------------------------------------------------------ DELLA
@pytest.mark.parametrize("shape", SHAPES)
def test_della_parity(shape):
    for ties in (False, True):
        x = data(shape, seed=12, ties=ties, specials=True)
        m = x.shape[-1] if x.dim() else 1
        rows = x.numel() // m if m else 0
        for d, e in ((0.5, 0.1), (0.3, 0.29), (1e-6, 5e-7), (0.0, 0.1), (1.0, 0.1)):
            for mode in ("inverse", "none"):
                want = S.della_reference(x, d, e, 5, KEY, mode)
                for threads in (1, 2):
                    assert_same(native(_native.della, x, rows, m, d, e, 5, KEY, mode, threads=threads), want)
                assert_same(S.della(x, d, e, 5, KEY, mode), want)
    xf = data(shape, seed=13)
    m = xf.shape[-1] if xf.dim() else 1
    rows = xf.numel() // m if m else 0
    assert_same_mask_close(
        native(_native.della, xf, rows, m, 0.4, 0.2, 5, KEY, "l1"), S.della_reference(xf, 0.4, 0.2, 5, KEY, "l1")
    )


def test_della_keep_probability_per_rank():
    rows, m, d, e = 4000, 100, 0.5, 0.3
    x = data((rows, m), seed=14)
    kept = (S.della(x, d, e, 1, "r#0", "none") != 0).float()
    ranks = torch.argsort(torch.argsort(x.abs(), dim=-1, stable=True), dim=-1)
    p = (d - e) + 2 * e * ranks.float() / (m - 1)
    for b in range(10):
        sel = (ranks >= 10 * b) & (ranks < 10 * (b + 1))
        got, expect = kept[sel].sum().item(), p[sel].sum().item()
        sd = math.sqrt((p[sel] * (1 - p[sel])).sum().item())
        assert abs(got - expect) < 4 * sd, (b, got, expect)


def test_della_rescale_preserves_expectation():
    x = data((10, 100), seed=15) + 0.05
    seeds, d, e = 400, 0.4, 0.2
    mean = sum(S.della(x, d, e, s, "e#1") for s in range(seeds)) / seeds
    p_min = d - e
    sd = x.abs() * math.sqrt((1 - p_min) / p_min / seeds)
    assert ((mean - x).abs() / sd).max() < 5


def test_della_invalid_parameters():
    x = data((4, 8))
    with pytest.raises(ValueError, match="density - epsilon"):
        S.della(x, 0.1, 0.2, 1, "k")
    with pytest.raises(ValueError):
        _native.della(x.clone().view(-1).numpy(), 4, 8, 0.1, 0.2, 1, "k", "inverse", 1)
    with pytest.raises(ValueError, match="rows"):
        _native.della(x.clone().view(-1).numpy(), 3, 8, 0.5, 0.1, 1, "k", "inverse", 1)


# ------------------------------------------------------------------ combine
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (1000,), (100003,), (3, 7), (97, 1031)])
def test_combine_parity(shape):
    for k in (1, 2, 3, 4):
        ds = [S.magnitude_reference(data(shape, seed=20 + i), 0.5) for i in range(k)]
        for weights in ([0.7, 0.4, -0.3, 1.1][:k], [0.5, -0.5, 0.25, -0.25][:k]):
            for consensus in (False, True):
                for normalize in (False, True):
                    want = C.combine_reference(ds, weights, consensus, normalize)
                    outs = []
                    for threads in (1, 2):
                        out = torch.empty(shape)
                        _native.combine(
                            [t.view(-1).numpy() for t in ds],
                            weights,
                            consensus,
                            normalize,
                            1.0,
                            None,
                            "F32",
                            out.view(-1).numpy(),
                            "F32",
                            threads,
                        )
                        outs.append(out)
                    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))
                    assert ulps(outs[0], want) <= 1
                    assert ulps(C.combine(ds, weights, consensus, normalize), want) <= 1


def test_combine_errors():
    a = torch.zeros(4)
    out = torch.zeros(4)
    with pytest.raises(ValueError):
        _native.combine(
            [a.numpy(), torch.zeros(3).numpy()], [1.0, 1.0], True, True, 1.0, None, "F32", out.numpy(), "F32", 1
        )
    with pytest.raises(ValueError):
        _native.combine([a.numpy()], [1.0], True, True, 1.0, None, "F32", out.numpy(), "I8", 1)
    with pytest.raises(ValueError, match="overlaps"):
        _native.combine([a.numpy()], [1.0], True, True, 1.0, None, "F32", a.numpy(), "F32", 1)
    with pytest.raises(ValueError):
        _native.combine([], [], True, True, 1.0, None, "F32", out.numpy(), "F32", 1)


# ------------------------------------------------------------------ fused GTA (native_dispatch.gta_merge)
def _task_vectors(xs, base):
    return [x.float() - base.float() for x in xs]


@pytest.mark.parametrize("shape", [(), (1,), (7,), (1000,), (3, 7), (97, 1031)])
def test_gta_merge_without_sparsity_matches_torch(shape):
    base = data(shape, seed=99).to(torch.bfloat16)
    for k in (1, 2, 3):
        xs = [(base.float() + data(shape, seed=20 + i)).to(torch.bfloat16) for i in range(k)]
        for weights in ([0.7, 0.4, -0.3][:k], [0.5, -0.5, 0.25][:k]):
            for consensus in (False, True):
                for normalize in (False, True):
                    spec = GtaSpec((NO_SPARSITY,) * k, tuple(weights), consensus, normalize, 0.8)
                    merged = C.combine_reference(_task_vectors(xs, base), weights, consensus, normalize)
                    want = (base.float() + 0.8 * merged).to(torch.bfloat16)
                    got = N.gta_merge(xs, base, spec, 0, torch.bfloat16)
                    assert got.dtype == torch.bfloat16 and got.shape == base.shape
                    assert ulps(got, want) <= 1


def _unfused(xs, base, spec, seed, out_dtype):
    """Task vectors, each sparsified by its own kernel (parity-tested above), then one combine."""
    ds = []
    for d, s in zip(_task_vectors(xs, base), spec.sparsity):
        if s.kind == "magnitude":
            d = S.magnitude(d, s.density)
        elif s.kind == "outliers":
            d = S.magnitude_outliers(d, s.density, s.gamma)
        elif s.kind == "random":
            d = S.random_mask(d, s.density, seed, s.key, s.rescale)
        elif s.kind == "della":
            d = S.della(d, s.density, s.epsilon, seed, s.key, s.rescale)
        ds.append(d.contiguous())
    out = torch.empty(base.shape, dtype=out_dtype)
    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    _native.combine(
        [bytes_view(d) for d in ds],
        list(spec.weights),
        spec.consensus,
        spec.normalize,
        spec.lam,
        bytes_view(base),
        code[base.dtype],
        bytes_view(out),
        code[out_dtype],
        1,
    )
    return out


def _sparsity(kind, density, i):
    key = f"model.layers.0.w#{i}"
    if kind == "magnitude":
        return Sparsity("magnitude", density)
    if kind == "outliers":
        return Sparsity("outliers", density, gamma=0.05)
    if kind == "random":
        return Sparsity("random", density, key=key, rescale="inverse" if i != 1 else "none")
    eps = min(0.05, density / 2, (1 - density) / 2) if 0 < density < 1 else 0.1
    return Sparsity("della", density, epsilon=eps, key=key, rescale="inverse" if i != 1 else "none")


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


GTA_KINDS = ["magnitude", "outliers", "random", "della", "mixed"]


@pytest.mark.parametrize("kind", GTA_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7,), (1,), (13, 257), (3, 1), (64, 1031)])
@pytest.mark.parametrize("density", [0.5, 0.9, 1e-3, 1.0, 0.0])
def test_gta_merge_is_bit_identical_to_the_unfused_kernels(kind, dtype, shape, density):
    base, xs = task_vector_family(shape, dtype)
    kinds = ["magnitude", "outliers", "della"] if kind == "mixed" else [kind] * 3
    sparsity = tuple(_sparsity(kd, density, i) for i, kd in enumerate(kinds))
    for consensus, normalize in ((True, True), (False, False)):
        spec = GtaSpec(sparsity, (0.5, -0.3, 0.2), consensus, normalize, 0.8)
        want = _unfused(xs, base, spec, 1234, dtype)
        for threads in (1, 2):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = N.gta_merge(xs, base, spec, 1234, dtype)
            finally:
                torch.set_num_threads(old)
            assert torch.equal(_bits(got), _bits(want)), (consensus, threads)


@pytest.mark.parametrize("kind", ["magnitude", "outliers", "random", "della"])
def test_gta_merge_nan_inf_and_out_buffer(kind):
    base, xs = task_vector_family((11, 37), torch.float32, seed=5)
    xs[0].view(-1)[[3, 50, 100]] = float("nan")
    xs[1].view(-1)[[4, 60]] = float("inf")
    xs[2].view(-1)[[5]] = float("-inf")
    for density in (0.5, 1e-3):
        spec = GtaSpec(tuple(_sparsity(kind, density, i) for i in range(3)), (0.5, -0.3, 0.2), True, True, 1.0)
        want = _unfused(xs, base, spec, 7, torch.float32)
        out = torch.empty_like(base)
        got = N.gta_merge(xs, base, spec, 7, torch.float32, out=out)
        assert got is out
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), density


def test_gta_merge_large_tensor_thresholds():
    # more than 2**20 elements: the order statistics take the sampled path
    n = (1 << 20) + 4099
    base, xs = task_vector_family((n,), torch.bfloat16, seed=3)
    xs[1][3] = float("nan")
    xs[2][4] = float("inf")
    for kinds in (["magnitude"] * 3, ["outliers"] * 3, ["magnitude", "outliers", "random"]):
        spec = GtaSpec(tuple(_sparsity(k, 0.3, i) for i, k in enumerate(kinds)), (0.5, 0.3, 0.2), True, True, 1.0)
        want = _unfused(xs, base, spec, 11, torch.bfloat16)
        assert torch.equal(_bits(N.gta_merge(xs, base, spec, 11, torch.bfloat16)), _bits(want)), kinds


def test_gta_merge_empty_tensor():
    base = torch.zeros((0, 5), dtype=torch.bfloat16)
    spec = GtaSpec((_sparsity("della", 0.5, 0),), (1.0,), True, True, 1.0)
    assert N.gta_merge([base.clone()], base, spec, 1, torch.float32).shape == (0, 5)


def test_gta_merge_errors():
    base, xs = task_vector_family((4, 8), torch.float32)
    spec = GtaSpec((Sparsity("magnitude", 0.5),) * 3, (1.0, 1.0, 1.0), False, False, 1.0)
    views = [bytes_view(x) for x in xs]
    out = torch.empty(4, 8)

    def call(spec=spec, codes=("F32",) * 3, seed=1, shape=(4, 8), out_view=None, out_code="F32"):
        out_view = bytes_view(out) if out_view is None else out_view
        N.gta_merge_views(views, list(codes), bytes_view(base), "F32", shape, spec, seed, out_view, out_code, 1)

    call()
    call(spec=GtaSpec((Sparsity("magnitude", 0.5, rescale="l1"),) * 3, (1.0, 1.0, 1.0), False, False, 1.0))
    for bad in (
        dict(spec=GtaSpec((), (), False, False, 1.0)),
        dict(spec=GtaSpec(spec.sparsity[:2], (1.0, 1.0), False, False, 1.0)),  # 3 inputs, 2 specs
        dict(codes=("F32", "I8", "F32")),
        dict(out_code="F64"),
        dict(seed=-1),
        dict(seed=1 << 64),
        dict(shape=(4, 9)),
        dict(out_view=bytes_view(torch.empty(3))),
        dict(out_view=views[0]),  # the output overlaps an input
        dict(spec=GtaSpec((Sparsity("della", 0.5, epsilon=0.6, key="k"),) * 3, (1.0,) * 3, False, False, 1.0)),
    ):
        with pytest.raises(InvalidArgumentError):
            call(**bad)
    with pytest.raises(MergekittyError):
        N.gta_merge([xs[0]], base, GtaSpec((NO_SPARSITY,), (1.0,), False, False, 1.0), 1, torch.float64)
    with pytest.raises(InvalidArgumentError, match="shape"):
        N.gta_merge([xs[0][:2]], base, GtaSpec((NO_SPARSITY,), (1.0,), False, False, 1.0), 1, torch.float32)


def test_native_sparsity_spec():
    s = _native.Sparsity("della", 0.4, epsilon=0.1, key="w#0", rescale="inverse")
    assert (s.kind, s.density, s.gamma, s.epsilon, s.key, s.rescale) == ("della", 0.4, 0.0, 0.1, "w#0", "inverse")
    assert _native.Sparsity("none").rescale == "none"
    for args, kw, match in (
        (("bogus",), {}, "kind"),
        (("magnitude", 0.5), {"rescale": "l1"}, "l1"),
        (("magnitude", 0.5), {"rescale": "inverse"}, "inverse"),
        (("random", float("nan")), {}, "density"),
    ):
        with pytest.raises(InvalidArgumentError, match=match):
            _native.Sparsity(*args, **kw)


# ------------------------------------------------------------------ argument checks and dispatch
def test_bad_buffers_raise_value_error():
    with pytest.raises(ValueError, match="float32"):
        _native.magnitude(bytearray(6), 0.5, False, 1)
    with pytest.raises(ValueError, match="rescale"):
        _native.random_mask(torch.zeros(4).numpy(), 0.5, 1, "k", "bogus", 1)
    with pytest.raises(ValueError):
        _native.magnitude(torch.zeros(4).numpy(), float("nan"), False, 1)
    misaligned = torch.zeros(5).view(torch.uint8)[1:17].numpy()
    with pytest.raises(ValueError, match="aligned"):
        _native.magnitude(misaligned, 0.5, False, 1)


def test_dispatch_does_not_modify_inputs_and_handles_layouts():
    x = data((64, 33), seed=30)
    keep = x.clone()
    xt = x.t()  # non-contiguous
    assert_same(S.magnitude(xt, 0.3), S.magnitude_reference(xt, 0.3))
    assert_same(S.della(xt, 0.5, 0.1, 1, "k"), S.della_reference(xt, 0.5, 0.1, 1, "k"))
    xb = x.to(torch.bfloat16)
    assert_same(S.random_mask(xb, 0.3, 1, "k"), S.random_mask_reference(xb, 0.3, 1, "k"))
    assert torch.equal(x, keep)
    # a negative seed is the reference's error, not the native one's
    with pytest.raises(ValueError, match="non-negative"):
        S.random_mask(x, 0.5, -1, "k")
