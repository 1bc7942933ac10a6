"""The merged task vector of the GTA family: a weighted sum, optionally with TIES sign election
and normalization (docs/kernels.md, "Sign consensus and merged delta").

All arithmetic is float32 and sums run in model order 0..k-1. ``combine_reference`` is the
plain-torch definition (any device); ``combine`` is what methods call and where a native CPU
kernel is dispatched to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from .sparsify import f32

if TYPE_CHECKING:
    import torch

NORMALIZE_EPS = 1e-8


def weight_sum(weights: Sequence[float]) -> float:
    """sum_i w_i accumulated in float32, in order."""
    total = 0.0
    for w in weights:
        total = f32(total + f32(w))
    return total


def combine_reference(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: bool, normalize: bool
) -> torch.Tensor:
    """M from task vectors ``deltas`` (same shape) and scalar ``weights``.

    - without consensus: ``M = sum_i w_i d_i``, divided by ``sum_i w_i`` when ``normalize``
      unless ``|sum w| < 1e-8`` (then left unnormalized);
    - with consensus: ``sigma = +1 where sum_i w_i d_i >= 0 else -1``; model i counts where
      ``w_i d_i`` is non-zero and has sign sigma; ``M = sum of the counted w_i d_i``, divided
      (when ``normalize``) by ``D = sum of the counted w_i`` where ``D != 0``.
    """
    import torch

    if len(deltas) == 0 or len(deltas) != len(weights):
        raise InvalidArgumentError("combine: one weight per task vector, at least one")
    ws = [f32(w) for w in weights]

    def term(i: int) -> torch.Tensor:
        return deltas[i].float() * ws[i]

    if not consensus:
        acc = term(0)
        for i in range(1, len(deltas)):
            acc.add_(term(i))
        if normalize:
            total = weight_sum(ws)
            if abs(total) >= NORMALIZE_EPS:
                acc.div_(total)
        return acc

    elected = term(0)
    for i in range(1, len(deltas)):
        elected.add_(term(i))
    positive = elected >= 0
    del elected
    acc = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    divisor = torch.zeros_like(acc) if normalize else None
    for i in range(len(deltas)):
        t = term(i)
        counts = torch.where(positive, t > 0, t < 0)
        acc.add_(t.masked_fill_(~counts, 0.0))
        if divisor is not None:
            divisor.add_(counts.to(torch.float32).mul_(ws[i]))
    if divisor is not None:
        acc = torch.where(divisor != 0, acc / divisor, acc)
    return acc


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """See :func:`combine_reference`. CPU tensors go to the native kernel (``ops.native_dispatch``)."""
    from . import native_dispatch

    out = native_dispatch.combine(deltas, weights, consensus, normalize)
    return out if out is not None else combine_reference(deltas, weights, consensus, normalize)
