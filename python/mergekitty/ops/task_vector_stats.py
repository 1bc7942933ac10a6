"""The task-vector figures of one tensor in plain torch: the definition the native kernel
``_native.task_vector_stats`` (``rust/src/kernels/task_vector_stats.rs``) is tested against.

``d_i = X_i.float() - B.float()``, with NaN and infinite differences counted and set to 0; the
sums are taken in float64. TIES keeps the elements whose ``|d_i|`` is at least the ``k``-th
largest, ``k = max(1, floor(density * n))`` (ties at the threshold kept), as
``sparsify.magnitude_reference`` does. The figures built from these sums are defined in
``mergekitty/inspect/figures.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["task_vector_stats_reference"]


def task_vector_stats_reference(base: torch.Tensor, models: list[torch.Tensor], density: float) -> dict[str, Any]:
    """The raw sums of ``_native.task_vector_stats`` for ``base`` and ``models`` (one shape)."""
    import torch

    b = base.float().reshape(-1)
    finite = torch.isfinite(b)
    n = b.numel()
    out: dict[str, Any] = {
        "numel": n,
        "base_sumsq": float(b[finite].double().square().sum()),
        "base_nonfinite": int((~finite).sum()),
    }
    ds = []
    for name in ("sumsq", "sum4", "nonzero", "nonfinite", "ties_sumsq", "ties_kept"):
        out[name] = []
    for m in models:
        d = m.float().reshape(-1) - b
        bad = ~torch.isfinite(d)
        d = d.masked_fill(bad, 0.0)
        ds.append(d)
        sq = d.double().square()
        out["sumsq"].append(float(sq.sum()))
        out["sum4"].append(float(sq.square().sum()))
        out["nonzero"].append(int((d != 0).sum()))
        out["nonfinite"].append(int(bad.sum()))
        if n == 0 or density <= 0:
            kept = torch.zeros_like(d, dtype=torch.bool)
        elif density >= 1:
            kept = torch.ones_like(d, dtype=torch.bool)
        else:
            k = max(1, math.floor(density * n))
            threshold = d.abs().topk(k).values[-1]
            kept = d.abs() >= threshold
        out["ties_sumsq"].append(float(sq[kept].sum()))
        out["ties_kept"].append(int(kept.sum()))
    for name in ("dot", "both_nonzero", "sign_agree"):
        out[name] = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            a, c = ds[i], ds[j]
            both = (a != 0) & (c != 0)
            out["dot"].append(float((a.double() * c.double()).sum()))
            out["both_nonzero"].append(int(both.sum()))
            out["sign_agree"].append(int((both & (a.signbit() == c.signbit())).sum()))
    return out
