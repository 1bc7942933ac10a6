"""Tensors as raw little-endian bytes, and their float32 values, without torch.

``RawTensor`` holds a tensor's bytes with its safetensors dtype code and shape; ``to_f32`` and
``from_f32`` convert byte rows to and from float32 with the native casts (exact widening,
round to nearest even when narrowing), the same rounding torch's ``.to(dtype)`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MergeError


@dataclass(frozen=True)
class RawTensor:
    """A tensor as raw little-endian bytes: ``data`` (any buffer), its safetensors dtype code
    ("F32", "F16", "BF16", "F64") and shape (rows first)."""

    data: Any
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:])

    def rows(self) -> np.ndarray:
        """The tensor as a ``[rows, row bytes]`` uint8 array (no copy)."""
        flat = np.frombuffer(memoryview(self.data), dtype=np.uint8)
        return flat.reshape(self.shape[0], -1) if self.shape[0] else flat.reshape(0, 0)


def read_raw(checkpoint, name: str) -> RawTensor:
    """Tensor ``name`` of ``checkpoint`` (an io.checkpoint.Checkpoint or an adapted one): its map
    view, or the bytes of the tensor torch computes where there is none (pickled checkpoints,
    LoRA-adapted tensors: both need torch to open in the first place)."""
    info = checkpoint.infos[name]
    view = checkpoint.view(name)
    if view is None:
        from ..ops.reduce import bytes_view

        view = bytes_view(checkpoint.tensor(name).contiguous().cpu())
    return RawTensor(view, str(info.dtype), tuple(info.shape))


def to_f32(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Byte rows of ``dtype`` as a float32 ``[rows, elems]`` array."""
    from .. import _native

    n = rows.shape[0]
    if dtype == "F64":
        return np.ascontiguousarray(rows).view("<f8").astype(np.float32).reshape(n, -1)
    if dtype not in ("F32", "F16", "BF16"):
        raise MergeError(f"cannot read values of dtype {dtype} as float32")
    src = np.ascontiguousarray(rows).reshape(-1)
    out = np.empty(src.size // (4 if dtype == "F32" else 2), dtype=np.float32)
    _native.convert(src.data, dtype, out.view(np.uint8).data, "F32", 1)
    return out.reshape(n, -1)


def from_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``[rows, elems]`` values as byte rows of ``dtype`` (round to nearest even)."""
    from .. import _native

    values = np.ascontiguousarray(values, dtype=np.float32)
    n = values.shape[0]
    if dtype == "F64":
        return values.astype("<f8").view(np.uint8).reshape(n, -1)
    if dtype not in ("F32", "F16", "BF16"):
        raise MergeError(f"cannot write float32 values as dtype {dtype}")
    size = 4 if dtype == "F32" else 2
    out = np.empty(values.size * size, dtype=np.uint8)
    _native.convert(values.view(np.uint8).reshape(-1).data, "F32", out.data, dtype, 1)
    return out.reshape(n, -1)
