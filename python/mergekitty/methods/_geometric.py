"""Shared pieces of the geometric methods (slerp, multislerp, karcher, model_stock, nearswap,
sce, arcee_fusion): float32 working copies, the result hand-off, and the SLERP kernel.

Shapes: the planner rejects inputs whose shapes differ (embeddings of different vocabulary
sizes included), so every method here sees tensors of one shape and does no cropping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MergeError

if TYPE_CHECKING:
    import torch

    from .base import MergeInputs

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
