"""Native CPU paths of ``ops.random``, ``ops.sparsify`` and ``ops.consensus``.

Each function here returns the result computed by ``mergekitty._native`` when the native path
applies (CPU tensors of a float dtype, valid arguments), or ``None`` so the caller falls back to
its torch ``*_reference`` (which also raises the argument errors). The sparsifiers copy the
input into a fresh float32 tensor and work on that in place, so inputs are never modified and
the result is float32 like the references'.

Thread count: ``torch.get_num_threads()``, which the executor sets from ``--threads``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
    from .sparsify import _rescale_mode

    if not _ok(x) or not _seed_ok(seed):
        return None
    mode = _rescale_mode(rescale)
    from .. import _native

    w = _work_copy(x)
    _native.random_mask(_buf(w), float(density), seed, key, mode, _threads())
    return w


def della(
    x: torch.Tensor, density: float, epsilon: float, seed: int, key: str, rescale="inverse"
) -> torch.Tensor | None:
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


def combine_into_base(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    base: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
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
    if (
        out is None
        or out.shape != shape
        or out.dtype != out_dtype
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        out = torch.empty(shape, dtype=out_dtype)
    _native.combine(
        [bytes_view(d) for d in ds],
        [float(w) for w in weights],
        bool(consensus),
        bool(normalize),
        float(lambda_),
        bytes_view(base),
        code_of(base.dtype),
        bytes_view(out),
        code_of(out_dtype),
        _threads(),
    )
    return out


# ---------------------------------------------------------------------------- fused GTA
_NO_UPPER = 0xFFFFFFFF  # a key above every magnitude key: "no upper bound" / "keep nothing"


def _gta_plan(spec, n: int):
    """(kernel spec tuple, ranks it needs, key mode) for one model's ``Sparsity`` (methods/gta.py),
    or None when the fused kernel cannot do it (L1 rescales)."""
    kind, density = spec.kind, float(spec.density)
    if kind == "none":
        return ("none",), [], "magnitude"
    if kind in ("magnitude", "random", "della") and density >= 1:
        return ("none",), [], "magnitude"
    if kind == "outliers" and density >= 1 and spec.gamma <= 0:
        return ("none",), [], "magnitude"
    if density <= 0:
        return ("band", _NO_UPPER, _NO_UPPER, "magnitude"), [], "magnitude"
    if kind == "magnitude":
        k = max(1, math.floor(density * n))
        return ("magnitude",), [n - k], "magnitude"
    if kind == "outliers":
        target = min(n, max(1, math.floor(density * n)))
        n_top = max(0, math.floor(float(spec.gamma) * n))
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top += n_bot
            n_bot = 0
        ranks = [n_bot] + ([n_bot + target] if n_top > 0 else [])
        return ("outliers", n_bot, n_top), ranks, "outliers"
    if kind == "random":
        return ("random", density, spec.key, bool(spec.rescale)), [], "magnitude"
    if kind == "della":
        from .sparsify import check_della

        check_della(density, float(spec.epsilon))  # the reference's error message
        return ("della", density, float(spec.epsilon), spec.key, bool(spec.rescale)), [], "magnitude"
    return None


def gta_merge(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    specs: Sequence,
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    seed: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Fused ``base + lambda_ * combine(sparsify_i(x_i - base))`` straight from the (mmapped)
    F32/F16/BF16 inputs, without materializing task vectors (``gta_merge_views``). ``specs``
    are ``methods.gta.Sparsity`` values; L1 rescales are not fused. ``None`` when the fused
    path does not apply."""
    import torch

    from ..io.dtypes import code_of
    from .reduce import bytes_view

    shape = base.shape
    if not xs or not all(_ok(t) and t.shape == shape and t.is_contiguous() for t in (base, *xs)):
        return None
    if (
        out is None
        or out.shape != shape
        or out.dtype != out_dtype
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        out = torch.empty(shape, dtype=out_dtype)
    done = gta_merge_views(
        [bytes_view(t) for t in xs], [code_of(t.dtype) for t in xs], bytes_view(base), code_of(base.dtype), tuple(shape),
        specs, weights, consensus, normalize, lambda_, seed, bytes_view(out), code_of(out_dtype), _threads(),
    )  # fmt: skip
    return out if done else None


def gta_merge_views(
    views: Sequence,
    codes: Sequence[str | None],
    base_view,
    base_code: str | None,
    shape: tuple[int, ...],
    specs: Sequence,
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    seed: int,
    out_view,
    out_code: str | None,
    threads: int,
) -> bool:
    """``gta_merge`` on raw little-endian byte buffers (memory maps, a pooled output buffer) of
    safetensors dtype ``codes``, every input of ``shape``: needs no torch. Fills ``out_view``
    and returns True, or returns False (nothing written) when the fused kernel cannot do it."""
    from ..io.dtypes import NATIVE_FLOAT_CODES

    n = math.prod(shape)
    if not views or len(views) != len(specs) or len(views) != len(weights) or not _seed_ok(seed) or n == 0:
        return False
    if not all(c in NATIVE_FLOAT_CODES for c in (*codes, base_code, out_code)):
        return False
    plans = [_gta_plan(s, n) for s in specs]
    if any(p is None for p in plans):
        return False
    from .. import _native

    keys = [[] for _ in views]
    if any(ranks for _, ranks, _ in plans):
        keys = _native.gta_thresholds(list(views), list(codes), base_view, base_code, [r for _, r, _ in plans],
                                      [m for _, _, m in plans], threads)  # fmt: skip
    kernel_specs = []
    for (plan, _, _), k in zip(plans, keys):
        if plan[0] == "magnitude":
            plan = ("band", k[0], _NO_UPPER, "magnitude")
        elif plan[0] == "outliers":
            _, n_bot, n_top = plan
            plan = ("band", k[0] if n_bot > 0 else 0, k[1] if n_top > 0 else _NO_UPPER, "outliers")
        kernel_specs.append(plan)
    row_len = shape[-1] if len(shape) >= 1 else 1
    _native.gta_combine(list(views), list(codes), base_view, base_code, out_view, out_code, [float(w) for w in weights],
                        kernel_specs, bool(consensus), bool(normalize), float(lambda_), row_len, seed, threads)  # fmt: skip
    return True
