"""The GTA family (ties, dare_*, breadcrumbs*, della*) and the ops they are built from
(ops.random, ops.sparsify, ops.consensus), each checked against an independent, straightforward
computation written here: Python loops over elements, sorted lists, the scalar definition of
the random generator."""

import logging
import math
import struct

import pytest
import torch

from helpers import model_logits, read_state, run_cli
from mergekitty.errors import ConfigError, MergeError
from mergekitty.methods.base import MergeInputs
from mergekitty.methods.registry import get_method
from mergekitty.ops import consensus, sparsify
from mergekitty.ops import random as rnd

GTA = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
NAME = "model.layers.0.mlp.up_proj.weight"


def f32(v):
    return struct.unpack("f", struct.pack("f", v))[0]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- the generator
def test_uniform_pinned_values():
    # the definition is pinned by literal values, so the torch and Rust generators cannot drift together
    assert rnd.stream(0, "a#0") == 0xE747D359273159E1
    got = [rnd.uniform_scalar(0, f"{NAME}#1", i) for i in (0, 1, 2**32 + 5)]
    assert got == [0.9367400407791138, 0.6987559795379639, 0.4114907383918762]


@pytest.mark.parametrize(
    "seed,key,start", [(0, "a#0", 0), (12345, f"{NAME}#2", 7), (2**40 + 3, "ünïcode#0", 2**32 - 5), (7, "x", 2**33)]
)
def test_uniform_matches_scalar_definition(seed, key, start):
    got = rnd.uniform(seed, key, 64, start=start)
    assert got.dtype == torch.float32
    expected = [rnd.uniform_scalar(seed, key, start + i) for i in range(64)]
    assert got.tolist() == expected


def test_uniform_scalar_is_the_documented_arithmetic():
    # an even more literal transcription of docs/kernels.md (mul32 by 16-bit halves)
    M = 0xFFFFFFFF

    def mul32(a, c):
        return ((a & 0xFFFF) * c + ((((a >> 16) * c) & 0xFFFF) << 16)) & M

    def fmix(h):
        h ^= h >> 16
        h = mul32(h, 0x85EBCA6B)
        h ^= h >> 13
        h = mul32(h, 0xC2B2AE35)
        return h ^ (h >> 16)

    h = 0xCBF29CE484222325
    for b in b"99:k#3":
        h = ((h ^ b) * 0x100000001B3) % 2**64
    k0, k1 = h & M, h >> 32
    for i in (0, 5, 2**32 + 1, 2**40 + 17):
        bits = fmix(fmix((i & M) ^ k0) ^ mul32(((i >> 32) ^ k1) & M, 0x27D4EB2F))
        assert rnd.uniform_scalar(99, "k#3", i) == (bits >> 8) / 2**24


def test_uniform_does_not_depend_on_chunking(monkeypatch):
    whole = rnd.uniform(3, "t#0", 1000)
    monkeypatch.setattr(rnd, "CHUNK", 37)
    assert torch.equal(rnd.uniform(3, "t#0", 1000), whole)
    assert torch.equal(rnd.uniform(3, "t#0", 100, start=450), whole[450:550])


def test_uniform_is_uniform():
    u = rnd.uniform(1, "stats", 1_000_000)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 1e6)
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert float(((counts - 1e6 / 16) ** 2 / (1e6 / 16)).sum()) < 50  # chi2 with 15 dof


# ---------------------------------------------------------------------------- independent references
def ref_magnitude(x, density):
    vals = x.reshape(-1).tolist()
    n = len(vals)
    if density >= 1:
        return x.clone()
    if density <= 0:
        return torch.zeros_like(x)
    k = max(1, int(density * n))
    t = sorted((abs(v) for v in vals), reverse=True)[k - 1]
    return torch.tensor([v if abs(v) >= t else 0.0 for v in vals]).view(x.shape)


def ref_outliers(x, density, gamma):
    vals = x.reshape(-1).tolist()
    n = len(vals)
    target = max(1, int(density * n))
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    asc = sorted(abs(v) for v in vals)
    lo = asc[n_bot]
    hi = asc[n_bot + target] if n_top > 0 else math.inf
    return torch.tensor([v if lo <= abs(v) and (abs(v) < hi or n_top == 0) else 0.0 for v in vals]).view(x.shape)


def ref_random(x, density, seed, key, rescale):
    d = f32(density)
    out = []
    for i, v in enumerate(x.reshape(-1).tolist()):
        keep = rnd.uniform_scalar(seed, key, i) < d
        out.append((v / d if rescale else v) if keep else 0.0)
    return torch.tensor(out).view(x.shape)


def ref_della(x, density, eps, seed, key, rescale):
    rows = x.reshape(-1, x.shape[-1]).tolist()
    out = []
    for r, row in enumerate(rows):
        m = len(row)
        order = sorted(range(m), key=lambda j: (abs(row[j]), j))
        rank = {j: pos for pos, j in enumerate(order)}
        for j, v in enumerate(row):
            rn = f32(rank[j] / f32(m - 1)) if m > 1 else 0.5
            p = f32(f32(f32(density) - f32(eps)) + f32(f32(2 * f32(eps)) * rn))
            keep = rnd.uniform_scalar(seed, key, r * m + j) < p
            out.append((f32(v / p) if rescale else v) if keep else 0.0)
    return torch.tensor(out).view(x.shape)


def ref_combine(deltas, weights, use_consensus, normalize):
    """Element by element, in float64."""
    k, n = len(deltas), deltas[0].numel()
    flat = [d.reshape(-1).double().tolist() for d in deltas]
    out = []
    for e in range(n):
        terms = [weights[i] * flat[i][e] for i in range(k)]
        if not use_consensus:
            m = sum(terms)
            s = sum(weights)
            out.append(m / s if normalize and abs(s) >= 1e-8 else m)
            continue
        sign = 1 if sum(terms) >= 0 else -1
        chosen = [i for i in range(k) if terms[i] != 0 and (terms[i] > 0) == (sign > 0)]
        m = sum(terms[i] for i in chosen)
        dsum = sum(weights[i] for i in chosen)
        out.append(m / dsum if normalize and dsum != 0 else m)
    return torch.tensor(out, dtype=torch.float64).view(deltas[0].shape)


# ---------------------------------------------------------------------------- sparsify ops
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(20,), (7, 9), (3, 4, 5)])
def test_magnitude_matches_sorted_list(density, shape):
    x = torch.randn(shape, generator=gen(1))
    got = sparsify.magnitude(x, density)
    assert torch.equal(got, ref_magnitude(x, density))
    assert (got != 0).sum() == (0 if density == 0 else max(1, int(density * x.numel())))


def test_magnitude_keeps_ties_and_nan():
    x = torch.tensor([1.0, -3.0, 2.0, 2.0, -2.0, float("nan"), 0.5])
    got = sparsify.magnitude(x, 3 / 7)  # k = 3: NaN, 3, then a tie of three 2s -> all kept
    assert torch.isnan(got[5]) and got[[0, 6]].eq(0).all() and got[[1, 2, 3, 4]].equal(x[[1, 2, 3, 4]])


def test_magnitude_tiny_tensor_low_density_keeps_one():
    x = torch.tensor([0.1, -5.0, 0.3, 0.2, 0.0, 0.1, 0.2, 0.4, 0.1, 0.3])
    got = sparsify.magnitude(x, 0.05)  # other tools assert here: int(0.05 * 10) == 0
    assert got.tolist() == [0, -5.0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_magnitude_l1_rescale():
    x = torch.randn(50, generator=gen(2))
    got = sparsify.magnitude(x, 0.2, rescale=True)
    torch.testing.assert_close(got.abs().sum(), x.abs().sum())
    torch.testing.assert_close(got, ref_magnitude(x, 0.2) * (x.abs().sum() / ref_magnitude(x, 0.2).abs().sum()))


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.2), (0.7, 0.0), (1.0, 0.05), (0.05, 0.5)])
@pytest.mark.parametrize("n", [10, 50, 333])
def test_outliers_match_sorted_list(density, gamma, n):
    x = torch.randn(n, generator=gen(n))
    assert torch.equal(sparsify.magnitude_outliers(x, density, gamma), ref_outliers(x, density, gamma))


def test_outliers_small_tensor_not_zeroed():
    x = torch.randn(50, generator=gen(3))  # fewer than 1/gamma elements: the existing tools return all zeros
    got = sparsify.magnitude_outliers(x, 0.9, 0.01)
    assert int((got != 0).sum()) == 45
    assert torch.equal(got, ref_magnitude(x, 0.9))  # nothing dropped from the top


def test_outliers_drop_the_top():
    x = torch.arange(1.0, 101.0)
    got = sparsify.magnitude_outliers(x, 0.5, 0.1)
    assert got.nonzero().view(-1).tolist() == list(range(40, 90))  # ranks 40..89 kept: top 10 and bottom 40 dropped


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [True, False])
def test_random_mask_matches_pointwise_definition(density, rescale):
    x = torch.randn(6, 17, generator=gen(4))
    got = sparsify.random_mask(x, density, 42, "w#0", rescale="inverse" if rescale else "none")
    assert torch.equal(got, ref_random(x, density, 42, "w#0", rescale))


def test_random_mask_l1_rescale():
    x = torch.randn(1000, generator=gen(5))
    got = sparsify.random_mask(x, 0.3, 1, "k", rescale="l1")
    plain = ref_random(x, 0.3, 1, "k", False)
    torch.testing.assert_close(got, plain * (x.abs().sum() / plain.abs().sum()))


def test_random_mask_statistics():
    n, density = 400_000, 0.3
    x = torch.ones(n)
    kept = int((sparsify.random_mask(x, density, 11, "s#0", "none") != 0).sum())
    assert abs(kept - density * n) < 5 * math.sqrt(n * density * (1 - density))


def test_random_mask_rescale_preserves_expectation():
    x = torch.randn(500, generator=gen(6))
    seeds = 400
    mean = sum(sparsify.random_mask(x, 0.25, s, "e#0") for s in range(seeds)) / seeds
    # per element: sd of the mean is |x| sqrt((1-p)/p / seeds)
    tol = 5 * x.abs() * math.sqrt(0.75 / 0.25 / seeds) + 1e-6
    assert ((mean - x).abs() <= tol).all()


def test_random_reproducible_and_keyed():
    x = torch.randn(4096, generator=gen(7))
    a = sparsify.random_mask(x, 0.5, 9, f"{NAME}#0")
    assert a.numpy().tobytes() == sparsify.random_mask(x, 0.5, 9, f"{NAME}#0").numpy().tobytes()
    assert not torch.equal(a != 0, sparsify.random_mask(x, 0.5, 10, f"{NAME}#0") != 0)
    assert not torch.equal(a != 0, sparsify.random_mask(x, 0.5, 9, f"{NAME}#1") != 0)
    d = sparsify.della(x.view(64, 64), 0.5, 0.1, 9, "d#0")
    assert torch.equal(d, sparsify.della(x.view(64, 64), 0.5, 0.1, 9, "d#0"))
    assert not torch.equal(d != 0, sparsify.della(x.view(64, 64), 0.5, 0.1, 9, "d#1") != 0)


@pytest.mark.parametrize("shape", [(5, 9), (40,), (2, 3, 4), (3, 1), ()])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_matches_pointwise_definition(shape, rescale):
    x = torch.randn(shape, generator=gen(8))
    x.view(-1)[:2] = 0.5  # a tie, broken by index
    got = sparsify.della(x, 0.5, 0.2, 3, "d#0", rescale="inverse" if rescale else "none")
    expected = ref_della(x.reshape(-1, x.shape[-1] if x.dim() else 1), 0.5, 0.2, 3, "d#0", rescale).view(shape)
    assert torch.equal(got, expected)


def test_della_chunked_rows(monkeypatch):
    x = torch.randn(50, 16, generator=gen(9))
    whole = sparsify.della(x, 0.4, 0.3, 1, "c#0")
    monkeypatch.setattr(sparsify, "ROW_CHUNK_ELEMENTS", 40)
    assert torch.equal(sparsify.della(x, 0.4, 0.3, 1, "c#0"), whole)


def test_della_keep_probability_per_rank():
    rows, m, density, eps = 20_000, 11, 0.5, 0.3
    # every row holds the magnitudes 1..m in a different order
    perm = torch.argsort(torch.rand(rows, m, generator=gen(10)), dim=1).float() + 1
    kept = sparsify.della(perm, density, eps, 5, "r#0", rescale="none") != 0
    for r in range(m):
        frac = float(kept[perm == r + 1].float().mean())
        p = density - eps + 2 * eps * r / (m - 1)
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / rows), (r, frac, p)


def test_della_rescale_preserves_expectation():
    x = torch.randn(20, 25, generator=gen(11))
    seeds = 400
    mean = sum(sparsify.della(x, 0.4, 0.2, s, "e#0") for s in range(seeds)) / seeds
    tol = 5 * x.abs() * math.sqrt((1 - 0.2) / 0.2 / seeds) + 1e-6  # worst case p = 0.2
    assert ((mean - x).abs() <= tol).all()


def test_della_invalid_epsilon():
    with pytest.raises(ValueError, match="density - epsilon"):
        sparsify.della(torch.ones(4, 4), 0.1, 0.2, 0, "k")
    with pytest.raises(ValueError, match="density \\+ epsilon"):
        sparsify.della(torch.ones(4, 4), 0.9, 0.2, 0, "k")
    # density 1 (the default) keeps everything whatever epsilon is
    assert torch.equal(sparsify.della(torch.ones(4, 4), 1.0, 0.15, 0, "k"), torch.ones(4, 4))


@pytest.mark.parametrize(
    "op",
    [
        lambda x: sparsify.magnitude(x, 0.3, True),
        lambda x: sparsify.magnitude_outliers(x, 0.3, 0.1, True),
        lambda x: sparsify.random_mask(x, 0.3, 0, "k", "l1"),
        lambda x: sparsify.della(x, 0.3, 0.1, 0, "k", "inverse"),
    ],
)
def test_sparsify_never_mutates_and_returns_float32(op):
    x = torch.randn(8, 8, generator=gen(12))
    before = x.clone()
    out = op(x)
    assert torch.equal(x, before) and out.dtype == torch.float32 and out.data_ptr() != x.data_ptr()
    half = op(x.to(torch.bfloat16))
    assert half.dtype == torch.float32


# ---------------------------------------------------------------------------- consensus
@pytest.mark.parametrize("use_consensus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_combine_matches_loop(use_consensus, normalize):
    deltas = [torch.randn(4, 5, generator=gen(20 + i)) for i in range(3)]
    deltas[1][0, :3] = 0
    w = [0.7, 0.4, -0.5]
    got = consensus.combine(deltas, w, use_consensus, normalize)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_combine(deltas, w, use_consensus, normalize), atol=1e-5, rtol=1e-5)


def test_combine_consensus_tie_goes_positive_and_zero_divisor():
    d = [torch.tensor([1.0, 0.0, -2.0]), torch.tensor([-1.0, 0.0, 2.0])]
    got = consensus.combine(d, [1.0, 1.0], True, True)
    # S = 0 -> sigma = +1: only the positive entries count; position 1: nobody counts, M = 0
    assert got.tolist() == [1.0, 0.0, 2.0]


def test_combine_zero_sum_weights_stay_finite():
    d = [torch.randn(10, generator=gen(30)), torch.randn(10, generator=gen(31))]
    got = consensus.combine(d, [1.0, -1.0], False, True)
    torch.testing.assert_close(got, d[0] - d[1])
    assert torch.isfinite(consensus.combine(d, [1.0, -1.0], True, True)).all()


# ---------------------------------------------------------------------------- methods
PARAMS = {
    "ties": {"normalize": True, "rescale": False},
    "dare_ties": {"normalize": False, "rescale": True, "rescale_l1": False},
    "dare_linear": {"normalize": False, "rescale": True, "rescale_l1": False},
    "breadcrumbs": {"normalize": False, "rescale": False},
    "breadcrumbs_ties": {"normalize": False, "rescale": False},
    "della": {"normalize": True, "rescale": True, "rescale_l1": False},
    "della_linear": {"normalize": False, "rescale": True, "rescale_l1": False},
}


def test_registered_defaults():
    for name in GTA:
        m = get_method(name)
        assert m.base == "required" and m.random == (name.startswith(("dare", "della")))
        defaults = {s.name: s.default for s in m.global_params}
        assert {k: defaults[k] for k in PARAMS[name]} == PARAMS[name], name
        assert defaults["lambda"] == 1.0 and defaults["int8_mask"] is False
        per_model = {s.name: s for s in m.model_params}
        assert per_model["weight"].required and per_model["density"].default == 1.0
        if "breadcrumbs" in name:
            assert per_model["gamma"].default == 0.01
        if "della" in name:
            assert per_model["epsilon"].default == 0.15 and "lambda" in per_model


def _run(name, xs, base, mparams, seed=0, out_dtype=torch.float32, tensor_name=NAME, **params):
    m = get_method(name)
    full = {s.name: s.default for s in m.global_params}
    full.update(params)
    mp = []
    for p in mparams:
        q = {s.name: s.default for s in m.model_params}
        q.update(p)
        mp.append(q)
    return m.merge(MergeInputs(tensor_name, list(xs), mp, full, base=base, out_dtype=out_dtype, seed=seed))


@pytest.fixture
def trio():
    base = torch.randn(20, generator=gen(40))
    return base, [base + torch.randn(20, generator=gen(41 + i)) for i in range(3)]


def test_ties_golden_loop(trio):
    base, xs = trio
    dens, w = [0.5, 0.3, 0.7], [1.0, 0.5, 0.7]
    got = _run("ties", xs, base, [{"weight": wi, "density": di} for wi, di in zip(w, dens)])
    # TIES by hand: trim by a sorted list, elect by the sign of the sum, disjoint mean
    deltas = []
    for x, d in zip(xs, dens):
        delta = [a - b for a, b in zip(x.tolist(), base.tolist())]
        k = int(d * 20)
        t = sorted(map(abs, delta), reverse=True)[k - 1]
        deltas.append([v if abs(v) >= t else 0.0 for v in delta])
    expected = []
    for e in range(20):
        terms = [w[i] * deltas[i][e] for i in range(3)]
        sign = 1 if sum(terms) >= 0 else -1
        agree = [i for i in range(3) if terms[i] * sign > 0]
        den = sum(w[i] for i in agree)
        expected.append(base[e].item() + (sum(terms[i] for i in agree) / den if den else 0.0))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GTA)
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_methods_match_composed_references(trio, name, lam):
    base, xs = trio
    base, xs = base.view(4, 5), [x.view(4, 5) for x in xs]
    dens, w, eps = [0.6, 0.4, 0.8], [0.9, 0.5, -0.3], 0.15
    mps = [{"weight": wi, "density": di} for wi, di in zip(w, dens)]
    got = _run(name, xs, base, mps, seed=77, **{"lambda": lam})
    p = PARAMS[name]
    deltas = []
    for i, (x, d) in enumerate(zip(xs, dens)):
        delta = x - base
        key = f"{NAME}#{i}"
        if name == "ties":
            deltas.append(ref_magnitude(delta, d))
        elif name.startswith("dare"):
            deltas.append(ref_random(delta, d, 77, key, True))
        elif name.startswith("breadcrumbs"):
            deltas.append(ref_outliers(delta, d, 0.01))
        else:
            deltas.append(ref_della(delta, d, eps, 77, key, True))
    merged = ref_combine(deltas, w, name in ("ties", "dare_ties", "breadcrumbs_ties", "della"), p["normalize"])
    expected = base.double() + lam * merged
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GTA)
def test_no_task_vectors_returns_base_and_inputs_untouched(name, trio):
    base, xs = trio
    assert torch.equal(_run(name, [], base, []), base)
    copies = [x.clone() for x in xs]
    out = _run(name, xs, base, [{"weight": 1.0, "density": 0.5}] * 3, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and all(torch.equal(a, b) for a, b in zip(xs, copies))


@pytest.mark.parametrize("name", GTA)
def test_tiny_tensors_low_density(name):
    base = torch.zeros(10)
    xs = [torch.randn(10, generator=gen(50 + i)) for i in range(2)]
    out = _run(name, xs, base, [{"weight": 1.0, "density": 0.3 if "della" in name else 0.05}] * 2)
    assert torch.isfinite(out).all()
    if name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        assert (out != 0).any()  # at least one element per model survives


def test_breadcrumbs_default_gamma_keeps_small_tensors():
    base = torch.zeros(64)  # e.g. a norm weight
    x = torch.randn(64, generator=gen(60))
    out = _run("breadcrumbs", [x], base, [{"weight": 1.0, "density": 0.9}])
    assert int((out != 0).sum()) == int(0.9 * 64)


@pytest.mark.parametrize("name", ["dare_linear", "breadcrumbs", "della_linear"])
def test_zero_sum_weights_finite_with_warning(name, trio, caplog):
    base, xs = trio
    with caplog.at_level(logging.WARNING):
        out = _run(name, xs[:2], base, [{"weight": 1.0}, {"weight": -1.0}], normalize=True, tensor_name=f"zero.{name}")
    torch.testing.assert_close(out, base + (xs[0] - base) - (xs[1] - base), atol=1e-5, rtol=1e-5)
    assert "sum to zero" in caplog.text


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della"])
def test_zero_sum_weights_with_consensus_finite(name, trio):
    base, xs = trio
    out = _run(name, xs[:2], base, [{"weight": 1.0}, {"weight": -1.0}], normalize=True)
    assert torch.isfinite(out).all()


def test_dare_keys_differ_per_model():
    base = torch.zeros(2000)
    x = torch.randn(2000, generator=gen(70))
    out = _run("dare_linear", [x, x], base, [{"weight": 1.0, "density": 0.5}] * 2, rescale=False)
    # the same mask for both would give only 0 or 2x
    assert ((out - x).abs() < 1e-6).sum() > 100 and (out.abs() < 1e-12).sum() > 100


def test_dare_seed_reproducible():
    base = torch.zeros(3000)
    x = torch.randn(3000, generator=gen(71))
    a = _run("dare_ties", [x], base, [{"weight": 1.0, "density": 0.3}], seed=5)
    assert (
        a.numpy().tobytes() == _run("dare_ties", [x], base, [{"weight": 1.0, "density": 0.3}], seed=5).numpy().tobytes()
    )
    assert not torch.equal(a, _run("dare_ties", [x], base, [{"weight": 1.0, "density": 0.3}], seed=6))


def test_dare_rescale_l1():
    base = torch.zeros(1000)
    x = torch.randn(1000, generator=gen(72))
    out = _run("dare_linear", [x], base, [{"weight": 1.0, "density": 0.3}], seed=1, rescale_l1=True)
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    plain = ref_random(x, 0.3, 1, f"{NAME}#0", False)
    torch.testing.assert_close(out, plain * (x.abs().sum() / plain.abs().sum()))


def test_della_first_model_lambda_wins(trio):
    base, xs = trio
    mps = [{"weight": 1.0, "density": 0.5, "lambda": 0.5}, {"weight": 1.0, "density": 0.5, "lambda": 3.0}]
    a = _run("della_linear", xs[:2], base, mps, seed=3, **{"lambda": 2.0})
    b = _run("della_linear", xs[:2], base, [{**m, "lambda": None} for m in mps], seed=3, **{"lambda": 0.5})
    torch.testing.assert_close(a, b)


def test_embedding_cropped_and_other_mismatch_skipped(caplog):
    base = torch.randn(6, 4, generator=gen(80))
    big = torch.randn(8, 4, generator=gen(81))
    out = _run("ties", [big], base, [{"weight": 1.0}], tensor_name="model.embed_tokens.weight")
    torch.testing.assert_close(out, big[:6])
    with caplog.at_level(logging.WARNING):
        out = _run(
            "ties",
            [big, base + 1],
            base,
            [{"weight": 1.0}, {"weight": 1.0}],
            tensor_name="model.layers.0.mlp.up_proj.weight",
        )
    torch.testing.assert_close(out, base + 1)
    assert "left out" in caplog.text


def test_integer_tensors_copied():
    base = torch.arange(10)
    assert torch.equal(_run("ties", [base.clone()], base, [{"weight": 1.0}], out_dtype=torch.int64), base)
    with pytest.raises(MergeError, match="integer"):
        _run("ties", [base + 1], base, [{"weight": 1.0}], out_dtype=torch.int64)


def test_out_buffer_filled():
    base = torch.zeros(3, 4)
    x = torch.randn(3, 4, generator=gen(90))
    buf = torch.empty(3, 4, dtype=torch.bfloat16)
    m = get_method("ties")
    params = {s.name: s.default for s in m.global_params}
    out = m.merge(
        MergeInputs(NAME, [x], [{"weight": 1.0, "density": 1.0}], params, base=base, out_dtype=torch.bfloat16, out=buf)
    )
    assert out.data_ptr() == buf.data_ptr() and torch.equal(buf, x.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", GTA)
def test_cuda_matches_cpu(name, trio):
    base, xs = trio
    base, xs = base.view(4, 5), [x.view(4, 5) for x in xs]
    mps = [{"weight": 0.7, "density": 0.5}] * 3
    cpu = _run(name, xs, base, mps, seed=4)
    gpu = _run(name, [x.cuda() for x in xs], base.cuda(), mps, seed=4)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=1e-6)
    if name.startswith(("dare", "della")):
        assert torch.equal(gpu.cpu() != base, cpu != base)  # the same masks


# ---------------------------------------------------------------------------- parameter validation at plan time
def _cfg(llama, method, model_params="", global_params=""):
    return f"""
base_model: {llama["base"]}
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 0.5{model_params}}}
  - model: {llama["ft2"]}
    parameters: {{weight: 0.5}}
merge_method: {method}
{global_params}
"""


@pytest.mark.parametrize("name", GTA)
def test_density_out_of_range_is_config_error(llama, name):
    from mergekitty.api import plan_merge

    with pytest.raises(ConfigError, match="density") as err:
        plan_merge(_cfg(llama, name, ", density: 1.5"))
    # the error points at the model entry that set it (line 5 of the YAML text)
    assert err.value.key == "models[0].parameters.density" and err.value.line == 5


def test_della_epsilon_rules(llama):
    from mergekitty.api import plan_merge

    with pytest.raises(ConfigError, match="density - epsilon"):
        plan_merge(_cfg(llama, "della", ", density: 0.1, epsilon: 0.2"))
    with pytest.raises(ConfigError, match="density \\+ epsilon"):
        plan_merge(_cfg(llama, "della_linear", ", density: 0.9"))
    with pytest.raises(ConfigError, match="epsilon"):
        plan_merge(_cfg(llama, "della", ", density: 0.5, epsilon: -0.1"))
    assert plan_merge(_cfg(llama, "della", ", density: 0.5, epsilon: 0.1")).jobs
    assert plan_merge(_cfg(llama, "della", "")).jobs  # density 1: valid with the default epsilon


def test_gamma_and_rescale_l1_validation(llama):
    from mergekitty.api import plan_merge

    with pytest.raises(ConfigError, match="gamma"):
        plan_merge(_cfg(llama, "breadcrumbs", ", gamma: 2"))
    with pytest.raises(ConfigError, match="rescale_l1"):
        plan_merge(_cfg(llama, "dare_ties", ", density: 0.5", "parameters: {rescale: false, rescale_l1: true}"))
    assert plan_merge(_cfg(llama, "dare_ties", ", density: 0.5", "parameters: {rescale_l1: true}")).jobs


def test_della_lambda_global_and_per_model(llama):
    from mergekitty.api import plan_merge

    plan = plan_merge(_cfg(llama, "della", ", density: 0.5, lambda: 0.7", "parameters: {lambda: 0.9}"))
    job = plan.jobs[0]
    assert job.params["lambda"] == 0.9 and job.model_params[0]["lambda"] == 0.7
    job = plan_merge(_cfg(llama, "ties", "", "parameters: {lambda: 0.9, int8_mask: true}")).jobs[0]
    assert job.params["lambda"] == 0.9 and job.params["int8_mask"] is True


# ---------------------------------------------------------------------------- end to end
E2E_PARAMS = {
    "ties": "density: 0.5",
    "dare_ties": "density: 0.5",
    "dare_linear": "density: 0.6",
    "breadcrumbs": "density: 0.8, gamma: 0.05",
    "breadcrumbs_ties": "density: 0.8, gamma: 0.05",
    "della": "density: 0.5, epsilon: 0.1",
    "della_linear": "density: 0.5, epsilon: 0.1",
}


# ties end to end in the fast selection; the other methods are slow
@pytest.mark.parametrize("name", [n if n == "ties" else pytest.param(n, marks=pytest.mark.slow) for n in GTA])
def test_cli_end_to_end(llama, tmp_path, write_yaml, name):
    cfg = write_yaml(f"""
base_model: {llama["base"]}
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 0.6, {E2E_PARAMS[name]}}}
  - model: {llama["ft2"]}
    parameters: {{weight: 0.4, {E2E_PARAMS[name]}}}
  - model: {llama["ft3"]}
    parameters: {{weight: 0.3, {E2E_PARAMS[name]}}}
merge_method: {name}
dtype: float32
random_seed: 17
""")
    out = tmp_path / "out"
    run_cli("mergekitty-yaml", cfg, out, "--quiet")
    assert torch.isfinite(model_logits(out)).all()
    got = read_state(out)
    base = read_state(llama["base"])
    assert set(got) == set(base)
    card = (out / "README.md").read_text()
    assert get_method(name).pretty_name in card
    if name.startswith(("dare", "della")):
        assert "17" in card
    if name == "ties":
        states = [read_state(llama[k]) for k in ("ft1", "ft2", "ft3")]
        w = [0.6, 0.4, 0.3]
        for k in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
            deltas = [ref_magnitude(s[k].float() - base[k].float(), 0.5) for s in states]
            expected = base[k].double() + ref_combine(deltas, w, True, True)
            torch.testing.assert_close(got[k].double(), expected, atol=1e-5, rtol=1e-5)
    if name == "dare_ties":
        again = tmp_path / "again"
        run_cli("mergekitty-yaml", cfg, again, "--quiet")
        for f in sorted(out.glob("*.safetensors")):
            assert f.read_bytes() == (again / f.name).read_bytes()
