"""Shared pieces of the geometric methods (slerp, multislerp, karcher, model_stock, nearswap,
sce, arcee_fusion): float32 working copies, the result hand-off, and the SLERP kernel.

Shapes: the planner rejects inputs whose shapes differ (embeddings of different vocabulary
sizes included), so every method here sees tensors of one shape and does no cropping.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..errors import MergeError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .base import MergeInputs, NativeInputs

# |cos theta| above this: the two vectors are treated as colinear (parallel or antipodal) and
# linearly interpolated. The value of mergekit's classic slerp; see slerp_vectors.
COLINEAR_DOT = 0.9995
# a vector whose norm is at most this counts as the zero vector
ZERO_NORM = 1e-12


def f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 (no copy when it already is; callers never write into it)."""
    import torch

    return x if x.dtype == torch.float32 else x.float()


def finish(result: torch.Tensor, inputs: MergeInputs) -> torch.Tensor:
    """Hand ``result`` back in the output dtype, written into ``inputs.out`` when given."""
    if inputs.out is not None:
        inputs.out.copy_(result.reshape(inputs.out.shape))
        return inputs.out
    return result.to(inputs.out_dtype or result.dtype)


def trivial(inputs: MergeInputs) -> torch.Tensor | None:
    """The result when there is nothing to compute, else None.

    - no non-base tensors: the base, unchanged;
    - integer tensors (position ids, masks): copied when every input agrees, an error otherwise.
    """
    every = [*([inputs.base] if inputs.base is not None else []), *inputs.tensors]
    if not inputs.tensors:
        if inputs.base is None:
            raise MergeError(f"no input tensors for '{inputs.name}'")
        return finish(inputs.base, inputs)
    if not every[0].is_floating_point():
        first = every[0]
        if all(t.shape == first.shape and bool((t == first).all()) for t in every[1:]):
            return finish(first, inputs)
        raise MergeError(
            f"tensor '{inputs.name}' has dtype {first.dtype} and differs between the models; integer tensors cannot be interpolated"
        )
    return None


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the vectors along the last axis of two float32 tensors.

        cos theta = v0.v1 / (|v0| |v1|)
        out = sin((1-t) theta)/sin theta * v0 + sin(t theta)/sin theta * v1

    on the unnormalized vectors (t=0 gives v0, t=1 gives v1, norms are interpolated along the
    arc). Where the result is ill-defined or ill-conditioned the plain lerp
    ``(1-t) v0 + t v1`` is used instead, vector by vector:
    - |cos theta| > 0.9995 (nearly parallel, where slerp equals lerp to ~1e-4, or nearly
      antipodal, where the great circle between the two is not unique);
    - either vector is zero (its direction is undefined).
    """
    import torch

    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True)
    zero = (n0 <= ZERO_NORM) | (n1 <= ZERO_NORM)
    dot = (v0 * v1).sum(dim=-1, keepdim=True) / torch.where(zero, torch.ones_like(n0), n0 * n1)
    dot = dot.clamp(-1.0, 1.0)
    lerp = zero | (dot.abs() > COLINEAR_DOT)
    theta = torch.arccos(torch.where(lerp, torch.zeros_like(dot), dot))
    sin = torch.sin(theta)
    safe = torch.where(lerp, torch.ones_like(sin), sin)
    c0 = torch.where(lerp, torch.full_like(dot, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(lerp, torch.full_like(dot, t), torch.sin(t * theta) / safe)
    return c0 * v0 + c1 * v1


def slerp_tensors(
    t: float, a: torch.Tensor, b: torch.Tensor, flatten: bool = True, row_wise: bool = False
) -> torch.Tensor:
    """SLERP of two float32 tensors of one shape, as whole vectors or per row / per column.

    - ``flatten``: each tensor is one vector;
    - otherwise ``row_wise``: each row ``x[i, :]`` (every vector along the last axis) separately;
    - otherwise: each column ``x[:, j]`` (every vector along the first axis) separately.
    A 1-D tensor is always one vector.
    """
    if flatten or a.dim() <= 1:
        return slerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise:
        return slerp_vectors(t, a, b)
    return slerp_vectors(t, a.movedim(0, -1), b.movedim(0, -1)).movedim(-1, 0)


# --- the native CPU path: a Gram pass, coefficients in numpy, a grouped weighted sum ---------
# These methods' results are linear combinations of their inputs whose coefficients depend only
# on inner products, so on CPU they run as two native passes over the memory maps
# (rust/src/kernels/gram.rs and reduce.rs): ``gram`` reads the inner products of each vector
# group, the method turns them into coefficients here, and ``combine`` writes the sum. The
# coefficients are computed in float64 from exact float64 Gram sums; the torch functions above
# compute the same formulas on float32 tensors, so the two agree to float32 rounding (tests:
# tests/test_native_geometric.py).

Groups = tuple[str, int]  # ("whole", 0), ("rows", row length) or ("columns", elements per first-axis index)
WHOLE: Groups = ("whole", 0)


def vector_groups(shape: tuple[int, ...], flatten: bool, row_wise: bool) -> Groups:
    """The vectors ``slerp_tensors`` interpolates, as a native grouping."""
    numel = math.prod(shape)
    if flatten or len(shape) <= 1 or numel == 0:
        return WHOLE
    if row_wise:
        return ("rows", shape[-1])
    return ("columns", numel // shape[0])


def group_count(shape: tuple[int, ...], groups: Groups) -> int:
    kind, size = groups
    if kind == "whole":
        return 1
    return math.prod(shape) // size if kind == "rows" else size


def native_gram(x: NativeInputs, which: list[int], center: int | None, groups: Groups) -> np.ndarray:
    """``G[g, i, j] = v_i . v_j`` (float64) for the vectors of group ``g`` of the job inputs
    ``which`` (minus input ``center`` when given)."""
    import numpy as np

    from .. import _native

    k = len(which)
    out = np.zeros((group_count(x.shape, groups), k, k), dtype=np.float64)
    _native.gram(
        [x.inputs[i] for i in which],
        [x.dtypes[i] for i in which],
        x.inputs[center] if center is not None else None,
        x.dtypes[center] if center is not None else None,
        groups[0],
        groups[1],
        out.reshape(-1).view(np.uint8).data,
        x.threads,
    )
    return out


def native_combine(x: NativeInputs, coefs: np.ndarray | list[float], groups: Groups = WHOLE) -> Any:
    """Write ``sum_i coefs[g, i] * input_i`` over every job input into ``x.out``; returns the
    ``TensorHealth``. ``coefs``: shape ``[groups, inputs]`` (or ``[inputs]`` for one group)."""
    import numpy as np

    from .. import _native

    c = np.ascontiguousarray(np.asarray(coefs, dtype=np.float32).reshape(-1, len(x.inputs)))
    return _native.weighted_sum_grouped(
        x.inputs,
        x.dtypes,
        c.reshape(-1).view(np.uint8).data,
        groups[0],
        groups[1],
        x.out,
        x.out_dtype,
        x.threads,
    )


def native_trivial(x: NativeInputs) -> Any | None:
    """``trivial`` for the native path: the base written as it is when there are no other
    inputs, else None (integer tensors never reach a native kernel)."""
    if x.models == 0:
        if not x.has_base:
            raise MergeError(f"no input tensors for '{x.name}'")
        return native_combine(x, [1.0])
    return None


def slerp_coefficients(t: float, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(c0, c1)`` per group with ``slerp_vectors(t, v0, v1) = c0 v0 + c1 v1``, from the
    groups' 2x2 Gram matrices of ``(v0, v1)``: the same decisions as ``slerp_vectors``."""
    import numpy as np

    n0 = np.sqrt(np.maximum(gram[:, 0, 0], 0.0))
    n1 = np.sqrt(np.maximum(gram[:, 1, 1], 0.0))
    zero = (n0 <= ZERO_NORM) | (n1 <= ZERO_NORM)
    with np.errstate(invalid="ignore", divide="ignore"):
        dot = np.clip(gram[:, 0, 1] / np.where(zero, 1.0, n0 * n1), -1.0, 1.0)
        lerp = zero | (np.abs(dot) > COLINEAR_DOT)
        theta = np.arccos(np.where(lerp, 0.0, dot))
        sin = np.where(lerp, 1.0, np.sin(theta))
        c0 = np.where(lerp, 1.0 - t, np.sin((1.0 - t) * theta) / sin)
        c1 = np.where(lerp, t, np.sin(t * theta) / sin)
    return c0, c1
