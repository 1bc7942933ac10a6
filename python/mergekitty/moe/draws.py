"""Seeded random arrays for MoE builds (random routers, expert noise), in numpy.

Every draw comes from the counter-based generator of docs/kernels.md ("Counter-based random
numbers", the one DARE uses, computed by the native module): ``uniform(seed, key, i)`` is a
pure function of the seed, a stream key and the flat element index ``i``, so the values do
not depend on torch being installed, the thread count or the order tensors are written in.

- ``uniform_array(seed, key, n)[i] = uniform(seed, key, i)``, float32 in [0, 1).
- ``normal_array(seed, key, n)[i]``, standard normal by Box-Muller from two streams::

      u1 = uniform(seed, key + "#radius", i)
      u2 = uniform(seed, key + "#angle", i)
      z  = sqrt(-2 * ln(1 - u1)) * cos(2 * pi * u2)

  computed in float64 and rounded to float32 (``1 - u1`` is in (0, 1], so the log is finite).

The stream keys the MoE build uses are listed where they are drawn (moe/gates.py, io/tensor_stream.py).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError

# elements per step of normal_array: keeps its float64 temporaries at a few MiB each
CHUNK = 1 << 20
_U64 = 1 << 64


def _check_seed(seed: int) -> None:
    if not 0 <= seed < _U64:
        raise InvalidArgumentError(f"random seed must be between 0 and 2**64 - 1, got {seed}")


def uniform_array(seed: int, key: str, n: int, start: int = 0) -> np.ndarray:
    """float32 ``uniform(seed, key, start + j)`` for ``j < n``."""
    from .. import _native

    _check_seed(seed)
    out = np.empty(n, dtype=np.float32)
    if n:
        _native.uniform(seed, key, start, out.data)
    return out


def normal_array(seed: int, key: str, n: int) -> np.ndarray:
    """float32 standard normal draws ``0 .. n - 1`` of stream ``key`` (Box-Muller, see above)."""
    out = np.empty(n, dtype=np.float32)
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        u1 = uniform_array(seed, key + "#radius", m, lo).astype(np.float64)
        u2 = uniform_array(seed, key + "#angle", m, lo).astype(np.float64)
        out[lo : lo + m] = np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)
    return out
