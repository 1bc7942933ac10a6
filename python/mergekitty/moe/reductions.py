"""The float32 sums and norms of the prompt-based gates, in numpy, in a fixed order.

Float32 addition is not associative, so the order is part of the result. These follow the
order of torch's CPU kernels (which computed the gates before): for a hidden size that is a
multiple of 32 the gates are bit for bit what torch gave on one thread (torch itself may
group the columns differently with several threads, or another hidden size).

- ``column_sum``: the sum over the rows of an ``[n, hidden]`` array as a cascade of four
  float32 accumulators per column: level 0 adds ``2**p`` rows in order
  (``p = max(4, ceil(log2 n) // 4)``), then is added into level 1 and cleared, level 1 into
  level 2 when its own count reaches ``2**p``, and so on; the rows left over go into level 0;
  the result is level 0 + level 1 + level 2 + level 3.
- ``l2_norms``: over the last axis, squares added in 8 lanes (lane ``j`` takes elements
  ``j, j + 8, ...`` of the largest multiple of 8), the lanes added in order, then the squares
  of the elements left over, then the square root.
"""

from __future__ import annotations

import numpy as np

LEVELS = 4
LANES = 8


def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def column_sum(rows: np.ndarray) -> np.ndarray:
    """float32 sum over axis 0 of the float32 ``[n, hidden]`` array ``rows`` (cascade order)."""
    n = rows.shape[0]
    power = max(4, _ceil_log2(n) // LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((LEVELS, rows.shape[1]), dtype=np.float32)
    i = 0
    while i + step <= n:
        for row in rows[i : i + step]:
            acc[0] += row
        i += step
        for level in range(1, LEVELS):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if i & (mask << (level * power)):
                break
    for row in rows[i:]:
        acc[0] += row
    for level in range(1, LEVELS):
        acc[0] += acc[level]
    return acc[0]


def l2_norms(v: np.ndarray) -> np.ndarray:
    """float32 L2 norm over the last axis of the float32 array ``v``, keeping that axis (size 1)."""
    hidden = v.shape[-1]
    whole = hidden - hidden % LANES
    squares = v[..., :whole] * v[..., :whole]
    lanes = squares.reshape(*v.shape[:-1], whole // LANES, LANES)
    # accumulate is in order along its axis, by definition (a plain sum may pair terms up)
    acc = (
        np.add.accumulate(lanes, axis=-2, dtype=np.float32)[..., -1, :]
        if whole
        else np.zeros((*v.shape[:-1], LANES), dtype=np.float32)
    )
    total = acc[..., 0].copy()
    for j in range(1, LANES):
        total += acc[..., j]
    for d in range(whole, hidden):
        total += v[..., d] * v[..., d]
    return np.sqrt(total)[..., None]


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """``v / ||v||`` over the last axis; a zero vector stays zero."""
    norm = l2_norms(v)
    with np.errstate(invalid="ignore"):
        out: np.ndarray = np.where(norm > 0, v / np.maximum(norm, np.float32(1e-12)), v)
    return out.astype(np.float32, copy=False)
