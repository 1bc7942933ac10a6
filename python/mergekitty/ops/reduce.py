"""Weighted sums: the whole arithmetic of linear-style merges, fused into one pass."""

from __future__ import annotations

from typing import Sequence

import torch

from ..io.dtypes import NATIVE_FLOAT_CODES, TORCH_TO_CODE


def weighted_sum_reference(tensors: Sequence[torch.Tensor], weights: Sequence[float], out_dtype: torch.dtype) -> torch.Tensor:
    """Plain torch: sum_i w_i * x_i in float32, then cast. The reference for the native kernel."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for x, w in zip(tensors, weights):
        acc.add_(x.to(torch.float32), alpha=float(w))
    return acc.to(out_dtype)


def _native_ok(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype) -> bool:
    if TORCH_TO_CODE.get(out_dtype) not in NATIVE_FLOAT_CODES:
        return False
    shape = tensors[0].shape
    for x in tensors:
        if x.device.type != "cpu" or not x.is_contiguous() or x.shape != shape:
            return False
        if TORCH_TO_CODE.get(x.dtype) not in NATIVE_FLOAT_CODES:
            return False
    return True


def _bytes_view(x: torch.Tensor):
    """A zero-copy uint8 numpy view of a contiguous CPU tensor (numpy has no bfloat16)."""
    return x.reshape(-1).view(torch.uint8).numpy()


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    out_dtype: torch.dtype,
    threads: int = 0,
) -> torch.Tensor:
    """sum_i weights[i] * tensors[i], accumulated in float32, returned in ``out_dtype``.

    On CPU this reads bf16/f16/f32 inputs straight from their (possibly mmapped)
    storage and writes the output dtype in a single fused native pass.
    """
    if len(tensors) == 0:
        raise ValueError("weighted_sum needs at least one tensor")
    if len(tensors) != len(weights):
        raise ValueError("weighted_sum: one weight per tensor")
    if not _native_ok(tensors, out_dtype):
        return weighted_sum_reference(tensors, weights, out_dtype)
    from .. import _native

    out = torch.empty(tensors[0].shape, dtype=out_dtype)
    _native.weighted_sum(
        [_bytes_view(x) for x in tensors],
        [TORCH_TO_CODE[x.dtype] for x in tensors],
        [float(w) for w in weights],
        _bytes_view(out),
        TORCH_TO_CODE[out_dtype],
        threads,
    )
    return out
