"""Native CPU paths of ``ops.random``, ``ops.sparsify`` and ``ops.consensus``.

Each function here returns the result computed by ``mergekitty._native`` when the native path
applies (CPU tensors of a float dtype, valid arguments), or ``None`` so the caller falls back to
its torch ``*_reference`` (which also raises the argument errors). The sparsifiers copy the
input into a fresh float32 tensor and work on that in place, so inputs are never modified and
the result is float32 like the references'.

Thread count: ``torch.get_num_threads()``, which the executor sets from ``--threads``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

_U64 = 1 << 64


def _ok(x: "torch.Tensor") -> bool:
    return x.device.type == "cpu" and x.is_floating_point() and not x.requires_grad


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _work_copy(x: "torch.Tensor") -> "torch.Tensor":
    """A new contiguous float32 tensor holding x (the references compute on ``x.float()``)."""
    import torch

    w = torch.empty(x.shape, dtype=torch.float32)
    w.copy_(x)
    return w


def _buf(w: "torch.Tensor"):
    """Writable numpy float32 view of a contiguous float32 CPU tensor (0-d included)."""
    return w.reshape(-1).numpy()


def _seed_ok(seed) -> bool:
    return isinstance(seed, int) and 0 <= seed < _U64


def uniform(seed: int, key: str, numel: int, device="cpu", start: int = 0) -> "torch.Tensor | None":
    import torch

    if torch.device(device).type != "cpu" or not _seed_ok(seed):
        return None
    if numel < 0 or start < 0 or start + numel > (1 << 63):
        return None
    out = torch.empty(numel, dtype=torch.float32)
    from .. import _native

    _native.uniform(seed, key, start, out.numpy())
    return out


def magnitude(x: "torch.Tensor", density: float, rescale: bool = False) -> "torch.Tensor | None":
    if not _ok(x):
        return None
    from .. import _native

    w = _work_copy(x)
    _native.magnitude(_buf(w), float(density), bool(rescale), _threads())
    return w


def magnitude_outliers(x: "torch.Tensor", density: float, gamma: float, rescale: bool = False) -> "torch.Tensor | None":
    if not _ok(x):
        return None
    from .. import _native

    w = _work_copy(x)
    _native.magnitude_outliers(_buf(w), float(density), float(gamma), bool(rescale), _threads())
    return w


def random_mask(x: "torch.Tensor", density: float, seed: int, key: str, rescale="inverse") -> "torch.Tensor | None":
    from .sparsify import _rescale_mode

    if not _ok(x) or not _seed_ok(seed):
        return None
    mode = _rescale_mode(rescale)
    from .. import _native

    w = _work_copy(x)
    _native.random_mask(_buf(w), float(density), seed, key, mode, _threads())
    return w


def della(x: "torch.Tensor", density: float, epsilon: float, seed: int, key: str, rescale="inverse") -> "torch.Tensor | None":
    from .sparsify import _rescale_mode, check_della

    if not _ok(x) or not _seed_ok(seed):
        return None
    mode = _rescale_mode(rescale)
    check_della(density, epsilon)  # the reference's error message
    from .. import _native

    w = _work_copy(x)
    m = x.shape[-1] if x.dim() >= 1 else 1
    rows = x.numel() // m if m else 0
    _native.della(_buf(w), rows, m, float(density), float(epsilon), seed, key, mode, _threads())
    return w


def _f32_contiguous(d: "torch.Tensor") -> "torch.Tensor":
    import torch

    return d.to(torch.float32).contiguous()


def combine(deltas: Sequence["torch.Tensor"], weights: Sequence[float], consensus: bool, normalize: bool) -> "torch.Tensor | None":
    import torch

    if len(deltas) == 0 or len(deltas) != len(weights):
        return None
    shape = deltas[0].shape
    if not all(_ok(d) and d.shape == shape for d in deltas):
        return None
    from .. import _native
    from .reduce import bytes_view

    ds = [_f32_contiguous(d) for d in deltas]
    out = torch.empty(shape, dtype=torch.float32)
    _native.combine([bytes_view(d) for d in ds], [float(w) for w in weights], bool(consensus), bool(normalize),
                    1.0, None, "F32", bytes_view(out), "F32", _threads())
    return out


def combine_into_base(
    deltas: Sequence["torch.Tensor"],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    base: "torch.Tensor",
    out_dtype: "torch.dtype",
    out: "torch.Tensor | None" = None,
) -> "torch.Tensor | None":
    """Fused ``(base.float() + lambda_ * combine(...)).to(out_dtype)`` in one pass: base is read
    straight from its (possibly mmapped) bf16/f16/f32 storage and the output written in
    ``out_dtype``. ``None`` when the native path does not apply."""
    import torch

    from ..io.dtypes import NATIVE_FLOAT_CODES, code_of

    if len(deltas) == 0 or len(deltas) != len(weights):
        return None
    shape = deltas[0].shape
    if not all(_ok(d) and d.shape == shape for d in deltas):
        return None
    if not (_ok(base) and base.shape == shape and base.is_contiguous()):
        return None
    if code_of(base.dtype) not in NATIVE_FLOAT_CODES or code_of(out_dtype) not in NATIVE_FLOAT_CODES:
        return None
    from .. import _native
    from .reduce import bytes_view

    ds = [_f32_contiguous(d) for d in deltas]
    if out is None or out.shape != shape or out.dtype != out_dtype or out.device.type != "cpu" or not out.is_contiguous():
        out = torch.empty(shape, dtype=out_dtype)
    _native.combine([bytes_view(d) for d in ds], [float(w) for w in weights], bool(consensus), bool(normalize),
                    float(lambda_), bytes_view(base), code_of(base.dtype), bytes_view(out), code_of(out_dtype),
                    _threads())
    return out
