"""The numpy building blocks of MoE gates: seeded draws and the float32 reductions.

The draws are checked against the documented formula in plain Python (``uniform_scalar`` is
the definition of the counter-based generator), the reductions against torch's CPU kernels,
whose order they follow, and against float64 sums.
"""

from __future__ import annotations

import math

import numpy as np
import pytest


def test_uniform_array_is_the_counter_based_generator():
    from mergekitty.moe.draws import uniform_array
    from mergekitty.ops.random import uniform_scalar

    got = uniform_array(7, "moe.gates.routed", 50, start=1000)
    want = [uniform_scalar(7, "moe.gates.routed", 1000 + j) for j in range(50)]
    assert got.dtype == np.float32 and got.tolist() == want


def test_normal_array_is_box_muller_of_two_streams():
    from mergekitty.moe import draws
    from mergekitty.ops.random import uniform_scalar

    def box_muller(i: int) -> float:
        u1 = uniform_scalar(3, "k#radius", i)
        u2 = uniform_scalar(3, "k#angle", i)
        return float(np.float32(math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2)))

    n = 2 * 37 + 5
    old_chunk = draws.CHUNK
    draws.CHUNK = 37  # several chunks: each must continue the streams where the last stopped
    try:
        got = draws.normal_array(3, "k", n)
    finally:
        draws.CHUNK = old_chunk
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [box_muller(i) for i in range(n)], rtol=1e-6, atol=1e-7)


def test_normal_array_is_standard_normal():
    from mergekitty.moe.draws import normal_array

    z = normal_array(0, "k", 200_000).astype(np.float64)
    assert np.isfinite(z).all()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # the share within one and two standard deviations: 68.3% and 95.4%
    assert abs((abs(z) < 1).mean() - 0.6827) < 0.005 and abs((abs(z) < 2).mean() - 0.9545) < 0.003


def test_draws_follow_seed_and_key():
    from mergekitty.moe.draws import normal_array

    a = normal_array(5, "k", 100)
    assert np.array_equal(a, normal_array(5, "k", 100))
    assert not np.array_equal(a, normal_array(6, "k", 100))
    assert not np.array_equal(a, normal_array(5, "other", 100))


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_out_of_range_is_refused(seed):
    from mergekitty.errors import InvalidArgumentError
    from mergekitty.moe.draws import uniform_array

    with pytest.raises(InvalidArgumentError, match="random seed must be between 0 and 2\\*\\*64 - 1"):
        uniform_array(seed, "k", 4)


@pytest.fixture
def one_torch_thread():
    """torch's sum groups columns per thread; on one thread its order is the documented one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# row counts on each side of the cascade's steps (16 rows, 16 * 16 rows)
ROWS = [1, 2, 15, 16, 17, 31, 33, 255, 256, 257, 300, 4097]


@pytest.mark.parametrize("n", ROWS)
def test_column_sum_adds_as_torch_does(n, one_torch_thread):
    import torch

    from mergekitty.moe.reductions import column_sum

    rng = np.random.default_rng(n)
    rows = (rng.standard_normal((n, 96)) * rng.uniform(0.01, 10, size=(n, 1))).astype(np.float32)
    got = column_sum(rows)
    assert got.dtype == np.float32
    assert np.array_equal(got, torch.from_numpy(rows).sum(0).numpy())
    np.testing.assert_allclose(got, rows.astype(np.float64).sum(0), rtol=1e-4, atol=1e-4 * math.sqrt(n))


@pytest.mark.parametrize("hidden", [1, 7, 8, 64, 100, 4096])
def test_l2_normalize_is_torch_norm_and_division(hidden):
    import torch

    from mergekitty.moe.reductions import l2_normalize

    rng = np.random.default_rng(hidden)
    v = (rng.standard_normal((3, hidden)) * 3).astype(np.float32)
    v[1] = 0
    got = l2_normalize(v)
    t = torch.from_numpy(v)
    norm = t.norm(dim=-1, keepdim=True)
    want = torch.where(norm > 0, t / norm.clamp_min(1e-12), t).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if hidden >= 8:  # torch adds in 8 lanes from 8 elements on; below that its order is its own
        assert np.array_equal(got, want)
    assert not got[1].any()
    np.testing.assert_allclose(np.linalg.norm(got[[0, 2]].astype(np.float64), axis=-1), 1, rtol=1e-6)
