"""Weighted sums: the whole arithmetic of linear-style merges, fused into one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from ..io.dtypes import NATIVE_FLOAT_CODES, code_of

if TYPE_CHECKING:
    import torch


def weighted_sum_reference(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], out_dtype: torch.dtype
) -> torch.Tensor:
    """Plain torch: sum_i w_i * x_i in float32, then cast. The reference for the native kernel."""
    acc = None
    for x, w in zip(tensors, weights):
        term = float(w) * x.float()
        acc = term if acc is None else acc + term
    return acc.to(out_dtype)


def _native_ok(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype) -> bool:
    if code_of(out_dtype) not in NATIVE_FLOAT_CODES:
        return False
    shape = tensors[0].shape
    return all(
        x.device.type == "cpu" and x.is_contiguous() and x.shape == shape and code_of(x.dtype) in NATIVE_FLOAT_CODES
        for x in tensors
    )


def bytes_view(x: torch.Tensor):
    """A zero-copy uint8 numpy view of a contiguous CPU tensor (numpy has no bfloat16)."""
    import torch

    return x.reshape(-1).view(torch.uint8).numpy()


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    out_dtype: torch.dtype,
    threads: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i weights[i] * tensors[i], accumulated in float32, returned in ``out_dtype``.

    On CPU this reads bf16/f16/f32 inputs straight from their (possibly mmapped)
    storage and writes the output dtype in a single fused native pass, into
    ``out`` when given (it must not overlap an input).
    """
    import torch

    if len(tensors) == 0:
        raise InvalidArgumentError("weighted_sum needs at least one tensor")
    if len(tensors) != len(weights):
        raise InvalidArgumentError("weighted_sum: one weight per tensor")
    if not _native_ok(tensors, out_dtype):
        result = weighted_sum_reference(tensors, weights, out_dtype)
        return out.copy_(result) if out is not None else result
    from .. import _native

    if out is None or out.dtype != out_dtype or out.shape != tensors[0].shape:
        out = torch.empty(tensors[0].shape, dtype=out_dtype)
    _native.weighted_sum(
        [bytes_view(x) for x in tensors],
        [code_of(x.dtype) for x in tensors],
        [float(w) for w in weights],
        bytes_view(out),
        code_of(out_dtype),
        threads,
    )
    return out
