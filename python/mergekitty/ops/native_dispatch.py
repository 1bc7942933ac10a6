"""Native CPU paths of ``ops.random``, ``ops.sparsify`` and ``ops.consensus``, and the fused GTA merge.

The per-op functions return the result computed by ``mergekitty._native`` when the native path
applies (CPU tensors of a float dtype, valid arguments), or ``None`` so the caller falls back to
its torch ``*_reference`` (which also raises the argument errors). The sparsifiers copy the
input into a fresh float32 tensor and work on that in place, so inputs are never modified and
the result is float32 like the references'.

``gta_merge_views`` (the executor's) and ``gta_merge`` (tests, benches) run a whole planned
``kernels.GtaSpec`` in one native call; they raise when the kernel cannot do what they are given.

Thread count: ``torch.get_num_threads()``, which the executor sets from ``--threads``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..text import dtype_text, shape_text

if TYPE_CHECKING:
    import torch
    from typing_extensions import Buffer

    from .. import _native
    from ..kernels import GtaSpec, Sparsity

_U64 = 1 << 64


def _ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.is_floating_point() and not x.requires_grad


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _work_copy(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous float32 tensor holding x (the references compute on ``x.float()``)."""
    import torch

    w = torch.empty(x.shape, dtype=torch.float32)
    w.copy_(x)
    return w


def _buf(w: torch.Tensor):
    """Writable numpy float32 view of a contiguous float32 CPU tensor (0-d included)."""
    return w.reshape(-1).numpy()


def _seed_ok(seed) -> bool:
    return isinstance(seed, int) and 0 <= seed < _U64


def uniform(seed: int, key: str, numel: int, device="cpu", start: int = 0) -> torch.Tensor | None:
    import torch

    if torch.device(device).type != "cpu" or not _seed_ok(seed):
        return None
    if numel < 0 or start < 0 or start + numel > (1 << 63):
        return None
    out = torch.empty(numel, dtype=torch.float32)
    from .. import _native

    _native.uniform(seed, key, start, out.numpy())
    return out


def magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor | None:
    if not _ok(x):
        return None
    from .. import _native

    w = _work_copy(x)
    _native.magnitude(_buf(w), float(density), bool(rescale), _threads())
    return w


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor | None:
    if not _ok(x):
        return None
    from .. import _native

    w = _work_copy(x)
    _native.magnitude_outliers(_buf(w), float(density), float(gamma), bool(rescale), _threads())
    return w


def random_mask(x: torch.Tensor, density: float, seed: int, key: str, rescale="inverse") -> torch.Tensor | None:
    from .sparsify import rescale_mode

    if not _ok(x) or not _seed_ok(seed):
        return None
    mode = rescale_mode(rescale)
    from .. import _native

    w = _work_copy(x)
    _native.random_mask(_buf(w), float(density), seed, key, mode, _threads())
    return w


def della(
    x: torch.Tensor, density: float, epsilon: float, seed: int, key: str, rescale="inverse"
) -> torch.Tensor | None:
    from .sparsify import check_della, rescale_mode

    if not _ok(x) or not _seed_ok(seed):
        return None
    mode = rescale_mode(rescale)
    check_della(density, epsilon)  # the reference's error message
    from .. import _native

    w = _work_copy(x)
    m = x.shape[-1] if x.dim() >= 1 else 1
    rows = x.numel() // m if m else 0
    _native.della(_buf(w), rows, m, float(density), float(epsilon), seed, key, mode, _threads())
    return w


def _f32_contiguous(d: torch.Tensor) -> torch.Tensor:
    import torch

    return d.to(torch.float32).contiguous()


def combine(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: bool, normalize: bool
) -> torch.Tensor | None:
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
    _native.combine(
        [bytes_view(d) for d in ds],
        [float(w) for w in weights],
        bool(consensus),
        bool(normalize),
        1.0,
        None,
        "F32",
        bytes_view(out),
        "F32",
        _threads(),
    )
    return out


# ---------------------------------------------------------------------------- fused GTA
def gta_merge_views(
    views: Sequence[Buffer],
    codes: Sequence[str],
    base_view: Buffer,
    base_code: str,
    shape: tuple[int, ...],
    spec: GtaSpec,
    seed: int,
    out_view: Buffer,
    out_code: str,
    threads: int,
) -> _native.TensorHealth:
    """``out = base + spec.lam * combine(sparsify_i(x_i - base))`` for one tensor of ``shape``, in one
    native call straight from raw little-endian byte buffers (memory maps, a pooled output buffer)
    of safetensors dtype ``codes`` (F32, F16 or BF16): needs no torch, and never materializes a
    task vector. One input per ``spec.sparsity`` entry, in order; the random sparsifiers draw from
    ``seed`` and each ``Sparsity.key``. Returns the kernel's ``TensorHealth`` (the inputs in
    ``views`` order, then the base, and the output).

    Raises ``InvalidArgumentError`` for what the kernel cannot do (``spec.native`` is False, a
    dtype other than F32/F16/BF16, buffers of the wrong size, a seed outside [0, 2**64)...);
    plans decide beforehand through ``GtaSpec.native``."""
    from .. import _native
    from ..errors import InvalidArgumentError
    from ..io.dtypes import NATIVE_FLOAT_CODES

    if not spec.native:
        raise InvalidArgumentError("the fused GTA kernel needs at least one input")
    if not _seed_ok(seed):
        raise InvalidArgumentError(f"random seed must be an integer in [0, 2**64), got {seed!r}")
    for code in (*codes, base_code, out_code):
        if code not in NATIVE_FLOAT_CODES:
            raise InvalidArgumentError(f"the fused GTA kernel reads and writes F32, F16 and BF16, not {code}")
    sparsity = [_sparsity(s, "none" if s.rescale == "l1" else s.rescale) for s in spec.sparsity]
    scales = None
    if any(s.rescale == "l1" for s in spec.sparsity):
        scales = _l1_scales(views, codes, base_view, base_code, shape, spec, seed, threads)
    return _native.gta_merge(
        list(views), list(codes), base_view, base_code, out_view, out_code, [int(d) for d in shape], sparsity,
        [float(w) for w in spec.weights], bool(spec.consensus), bool(spec.normalize), float(spec.lam), seed, threads,
        scales,
    )  # fmt: skip


def _sparsity(s: Sparsity, rescale: str) -> _native.Sparsity:
    from .. import _native

    return _native.Sparsity(s.kind, float(s.density), float(s.gamma), float(s.epsilon), s.key, rescale)


# elements converted to float32 at a time by the L1 sums
_L1_CHUNK = 1 << 20


def _l1_scales(
    views: Sequence[Buffer],
    codes: Sequence[str],
    base_view: Buffer,
    base_code: str,
    shape: tuple[int, ...],
    spec: GtaSpec,
    seed: int,
    threads: int,
) -> list[float]:
    """The L1 rescale factor of each model (1 where it has none): ``f32(sum|d| / sum|kept|)``
    when both sums are at least ``L1_EPS``, as ``ops.sparsify`` applies it. The kept values come
    from the same kernel with the model alone (``base + kept`` in float32), so the masks are
    those of the merge; the sums run in float64 over float32 chunks."""
    import math

    import numpy as np

    from .. import _native
    from .sparsify import L1_EPS

    n = math.prod(shape)
    kept = np.empty(n, dtype=np.float32)
    scales = []
    for i, s in enumerate(spec.sparsity):
        if s.rescale != "l1":
            scales.append(1.0)
            continue
        _native.gta_merge(
            [views[i]], [codes[i]], base_view, base_code, kept.view(np.uint8).data, "F32", [int(d) for d in shape],
            [_sparsity(s, "none")], [1.0], False, False, 1.0, seed, threads,
        )  # fmt: skip
        total = kept_total = 0.0
        for start in range(0, n, _L1_CHUNK):
            stop = min(n, start + _L1_CHUNK)
            b = _f32_chunk(base_view, base_code, start, stop)
            total += float(np.abs(_f32_chunk(views[i], codes[i], start, stop) - b).sum(dtype=np.float64))
            kept_total += float(np.abs(kept[start:stop] - b).sum(dtype=np.float64))
        ok = total >= L1_EPS and kept_total >= L1_EPS
        scales.append(float(np.float32(total / kept_total)) if ok else 1.0)
    return scales


def _f32_chunk(view: Buffer, code: str, start: int, stop: int):
    """Elements ``start:stop`` of a raw F32/F16/BF16 buffer as a float32 numpy array."""
    import numpy as np

    from .. import _native

    size = 4 if code == "F32" else 2
    raw = memoryview(view).cast("B")[start * size : stop * size]
    out = np.empty(stop - start, dtype=np.float32)
    _native.convert(raw, code, out.view(np.uint8).data, "F32", 1)
    return out


def gta_merge(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    spec: GtaSpec,
    seed: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gta_merge_views`` on CPU tensors (every input of the base's shape), for tests and benches:
    ``(base.float() + spec.lam * combine(...)).to(out_dtype)``. Writes into ``out`` when it is a
    contiguous CPU tensor of the base's shape and ``out_dtype``, otherwise into a new tensor."""
    import torch

    from ..errors import InvalidArgumentError
    from .reduce import bytes_view

    shape = base.shape
    for t in (base, *xs):
        if t.device.type != "cpu" or t.shape != shape:
            raise InvalidArgumentError(
                f"gta_merge takes CPU tensors of the base's shape {shape_text(shape)}, got {t.device} {shape_text(t.shape)}"
            )
    xs = [t.contiguous() for t in xs]
    base = base.contiguous()
    if (
        out is None
        or out.shape != shape
        or out.dtype != out_dtype
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        out = torch.empty(shape, dtype=out_dtype)
    gta_merge_views(
        [bytes_view(t) for t in xs], [_code(t.dtype) for t in xs], bytes_view(base), _code(base.dtype), tuple(shape),
        spec, seed, bytes_view(out), _code(out_dtype), _threads(),
    )  # fmt: skip
    return out


def _code(dtype: torch.dtype) -> str:
    from ..errors import InvalidArgumentError
    from ..io.dtypes import code_of

    code = code_of(dtype)
    if code is None:
        raise InvalidArgumentError(f"dtype {dtype_text(dtype)} has no safetensors code")
    return code
