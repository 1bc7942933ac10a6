"""Sparsification of task vectors: magnitude top-k (TIES), magnitude outliers (Breadcrumbs),
random drop (DARE) and rank-weighted random drop (DELLA), exactly as docs/kernels.md defines them.

Every function takes a float tensor (computed in float32) and returns a new float32 tensor of
the same shape; the input is never modified. ``<name>_reference`` is the plain-torch
implementation, which runs on any device; the public ``<name>`` is what methods call, and is
where a native CPU kernel is dispatched to (see ``ops/reduce.py`` for the pattern) — the
references stay the definition the native path is tested against.

Random draws come from ``ops.random.uniform(seed, key, ...)`` indexed by the flat element
index, so masks are identical on every device and for any chunking.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from .random import uniform

if TYPE_CHECKING:
    import torch

L1_EPS = 1e-8
ROW_CHUNK_ELEMENTS = 1 << 22  # DELLA ranks rows this many elements at a time (bounds the int64 temporaries)
RESCALES = ("inverse", "l1", "none")


def f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (returned as a Python float, exactly representable in float32)."""
    import torch

    return torch.tensor(float(value), dtype=torch.float32).item()


def rescale_mode(rescale) -> str:
    if rescale is True:
        return "inverse"
    if rescale is False or rescale is None:
        return "none"
    if rescale not in RESCALES:
        raise InvalidArgumentError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    return rescale


def _l1_rescale_(kept: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """kept *= f32(sum|x| / sum|kept|) (sums in float64) when both sums are >= 1e-8; in place."""
    import torch

    total = float(x.abs().sum(dtype=torch.float64))
    kept_total = float(kept.abs().sum(dtype=torch.float64))
    if total >= L1_EPS and kept_total >= L1_EPS:
        kept.mul_(f32(total / kept_total))
    return kept


def _zero_where_not(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~keep, 0.0)


# ---------------------------------------------------------------------------- magnitude (TIES)
def magnitude_reference(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``k = max(1, floor(density * n))`` largest magnitudes (and every tie at the threshold).

    NaN magnitudes count as larger than everything. ``rescale``: multiply the kept values by
    ``sum|x| / sum|kept|`` when both sums are >= 1e-8.
    """
    import torch

    x = x.float()
    if density >= 1:
        return x.clone()
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    n = x.numel()
    k = max(1, math.floor(density * n))
    mags = x.abs().reshape(-1)
    nan = torch.isnan(mags)
    n_nan = int(nan.sum())
    if k <= n_nan:
        keep = nan
    else:
        # the (k - n_nan)-th largest of the non-NaN magnitudes; NaNs (as -1) rank below all of them
        ranked = mags.masked_fill(nan, -1.0) if n_nan else mags
        t = torch.kthvalue(ranked, n - k + n_nan + 1).values
        keep = (mags >= t) | nan
    out = _zero_where_not(keep.view(x.shape), x)
    return _l1_rescale_(out, x) if rescale else out


def magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """See :func:`magnitude_reference`. CPU tensors go to the native kernel (``ops.native_dispatch``)."""
    from . import native_dispatch

    out = native_dispatch.magnitude(x, density, rescale)
    return out if out is not None else magnitude_reference(x, density, rescale)


# ---------------------------------------------------------------------------- magnitude outliers (Breadcrumbs)
def magnitude_outliers_reference(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Drop the ``n_top = floor(gamma * n)`` largest and the smallest magnitudes, keeping ``max(1, floor(density * n))``.

    With ``n_bot = n - target - n_top`` (if negative, it is taken from ``n_top``), ``lo`` is the
    magnitude at ascending rank ``n_bot`` and ``hi`` the one at rank ``n_bot + target``; the
    elements with ``lo <= |x| < hi`` are kept, or ``lo <= |x|`` when ``n_top == 0`` (so, unlike
    other tools, a tensor smaller than 1/gamma is never zeroed). NaN magnitudes count as +inf.
    ``rescale``: L1 rescale as in :func:`magnitude_reference`.
    """
    import torch

    x = x.float()
    if density >= 1 and gamma <= 0:
        return x.clone()
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    n = x.numel()
    target = min(n, max(1, math.floor(density * n)))
    n_top = max(0, math.floor(gamma * n))
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    mags = torch.nan_to_num(x.abs().reshape(-1), nan=math.inf)
    keep = mags >= torch.kthvalue(mags, n_bot + 1).values if n_bot > 0 else torch.ones_like(mags, dtype=torch.bool)
    if n_top > 0:
        keep &= mags < torch.kthvalue(mags, n_bot + target + 1).values
    out = _zero_where_not(keep.view(x.shape), x)
    return _l1_rescale_(out, x) if rescale else out


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """See :func:`magnitude_outliers_reference`. CPU tensors go to the native kernel."""
    from . import native_dispatch

    out = native_dispatch.magnitude_outliers(x, density, gamma, rescale)
    return out if out is not None else magnitude_outliers_reference(x, density, gamma, rescale)


# ---------------------------------------------------------------------------- random (DARE)
def random_mask_reference(x: torch.Tensor, density: float, seed: int, key: str, rescale="inverse") -> torch.Tensor:
    """Keep element i when ``uniform(seed, key, i) < density`` (density as float32).

    ``rescale``: "inverse" divides the kept values by density (the DARE paper), "l1" multiplies
    them by ``sum|x| / sum|kept|`` (mergekit 0.1.5), "none" leaves them.
    """
    import torch

    mode = rescale_mode(rescale)
    x = x.float()
    if density >= 1:
        return x.clone()
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    d = f32(density)
    keep = uniform(seed, key, x.numel(), device=x.device).view(x.shape) < d
    if mode == "inverse":
        return _zero_where_not(keep, x / d)
    out = _zero_where_not(keep, x)
    return _l1_rescale_(out, x) if mode == "l1" else out


def random_mask(x: torch.Tensor, density: float, seed: int, key: str, rescale="inverse") -> torch.Tensor:
    """See :func:`random_mask_reference`. CPU tensors go to the native kernel."""
    from . import native_dispatch

    out = native_dispatch.random_mask(x, density, seed, key, rescale)
    return out if out is not None else random_mask_reference(x, density, seed, key, rescale)


# ---------------------------------------------------------------------------- rank-weighted random (DELLA)
def check_della(density: float, epsilon: float) -> None:
    """Raise ValueError unless ``density - epsilon > 0`` and ``density + epsilon <= 1`` (for 0 < density < 1)."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon <= 1):
        raise InvalidArgumentError(
            f"DELLA needs density - epsilon > 0 and density + epsilon <= 1 (keep probabilities inside (0, 1]); "
            f"got density {density:g}, epsilon {epsilon:g}"
        )


def della_keep_probability(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row (last dimension, length m) of a 2-D float32 block: ``p = (density - eps) + (2 eps) * r / (m - 1)``
    with r the ascending rank of the magnitude, ties broken by index (``r / (m - 1) = 0.5`` when m == 1)."""
    import torch

    rows, m = mags.shape
    lo = f32(f32(density) - f32(epsilon))  # a float32 subtraction
    span = f32(2 * f32(epsilon))  # exact
    if m == 1:
        rn = torch.full_like(mags, 0.5)
    else:
        order = torch.argsort(mags, dim=-1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(m, device=mags.device).expand(rows, m))
        rn = ranks.to(torch.float32).div_(float(m - 1))
    return rn.mul_(span).add_(lo)


def della_reference(
    x: torch.Tensor, density: float, epsilon: float, seed: int, key: str, rescale="inverse"
) -> torch.Tensor:
    """Keep element i with probability ``p_i`` (:func:`della_keep_probability`), drawn as ``uniform(seed, key, i) < p_i``
    with i the flat index over the whole tensor. ``rescale``: "inverse" divides each kept value by its own
    ``p_i`` (the DELLA paper), "l1" rescales as mergekit 0.1.5 does, "none" leaves them."""
    import torch

    mode = rescale_mode(rescale)
    x = x.float()
    if density >= 1:
        return x.clone()
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    check_della(density, epsilon)
    m = x.shape[-1] if x.dim() >= 1 else 1
    rows = x.numel() // m
    flat = x.reshape(rows, m)
    out = torch.empty_like(flat)
    step = max(1, ROW_CHUNK_ELEMENTS // m)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        blk = flat[r0:r1]
        p = della_keep_probability(blk.abs(), density, epsilon)
        keep = uniform(seed, key, (r1 - r0) * m, device=x.device, start=r0 * m).view(r1 - r0, m) < p
        out[r0:r1] = _zero_where_not(keep, blk / p if mode == "inverse" else blk)
    out = out.view(x.shape)
    return _l1_rescale_(out, x) if mode == "l1" else out


def della(x: torch.Tensor, density: float, epsilon: float, seed: int, key: str, rescale="inverse") -> torch.Tensor:
    """See :func:`della_reference`. CPU tensors go to the native kernel."""
    from . import native_dispatch

    out = native_dispatch.della(x, density, epsilon, seed, key, rescale)
    return out if out is not None else della_reference(x, density, epsilon, seed, key, rescale)
