"""Model Stock (arXiv:2403.19522): interpolate the average of the fine-tuned models towards
the base by a ratio read off the angle between their task vectors.

With base ``W0`` and ``N >= 2`` other models ``W_i``, offsets ``o_i = W_i - W0``:
    cos theta = mean over pairs i < j of  o_i.o_j / (|o_i| |o_j|)      (each clamped to [-1, 1])
    t = N cos theta / (1 + (N - 1) cos theta)
    out = t * mean_i(W_i) + (1 - t) * W0

With ``filter_wise: false`` (default) each tensor is one vector; with ``filter_wise: true`` the
angle and ``t`` are computed for every row (vector along the last axis) separately, a 1-D
tensor being one row. Computed in float32.

Negative ``cos theta`` gives a negative ``t`` (the formula's extrapolation away from the
average), as in the paper and both existing tools. Defined results where the formula breaks
down (mergekit gives inf/NaN there): a pair with a zero offset contributes cos = 0, and where
``1 + (N-1) cos theta`` vanishes (|.| < 1e-6) the base is returned (t = 0). (mergekit divides
by max(|o_i||o_j|, 1e-6) instead of testing for zero, which also understates cos theta for
very small offsets.)
"""

from __future__ import annotations

from ..errors import MergeError
from ._geometric import WHOLE, ZERO_NORM, f32, finish, native_combine, native_gram, native_trivial, trivial
from .base import MergeInputs, MergeMethod, NativeInputs, ParamSpec, TorchFunction


def merge(inputs: MergeInputs):
    import torch

    done = trivial(inputs)
    if done is not None:
        return done
    if inputs.base is None or len(inputs.tensors) < 2:
        raise MergeError(f"tensor '{inputs.name}': model_stock needs a base model and at least two other models")
    base = f32(inputs.base)
    shape = base.shape
    if inputs.params.get("filter_wise") and base.dim() > 1:
        rows = (-1, shape[-1])
    else:
        rows = (1, -1)
    w0 = base.reshape(rows)
    ws = [f32(x).reshape(rows) for x in inputs.tensors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            prod = norms[i] * norms[j]
            zero = (norms[i] <= ZERO_NORM) | (norms[j] <= ZERO_NORM)
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cos = torch.where(zero, torch.zeros_like(dot), dot / torch.where(zero, torch.ones_like(prod), prod))
            cos_sum += cos.clamp(-1.0, 1.0)
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)
    n = len(ws)
    denom = 1.0 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    avg = torch.stack(ws).mean(dim=0)
    result = t * avg + (1.0 - t) * w0
    return finish(result.reshape(shape), inputs)


def native(x: NativeInputs):
    """``merge`` on CPU: cos theta per vector from the offsets' Gram matrices, then
    ``(1 - t) W0 + sum_i (t / N) W_i`` in one weighted sum."""
    import numpy as np

    done = native_trivial(x)
    if done is not None:
        return done
    if not x.has_base or x.models < 2:
        raise MergeError(f"tensor '{x.name}': model_stock needs a base model and at least two other models")
    groups = ("rows", x.shape[-1]) if x.params.get("filter_wise") and len(x.shape) > 1 else WHOLE
    n = x.models
    gram = native_gram(x, list(range(1, n + 1)), 0, groups)
    norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 0.0))
    cos_sum = np.zeros(gram.shape[0])
    pairs = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(n):
            for j in range(i + 1, n):
                zero = (norms[:, i] <= ZERO_NORM) | (norms[:, j] <= ZERO_NORM)
                prod = np.where(zero, 1.0, norms[:, i] * norms[:, j])
                cos_sum += np.where(zero, 0.0, np.clip(gram[:, i, j] / prod, -1.0, 1.0))
                pairs += 1
        cos = cos_sum / pairs
        denom = 1.0 + (n - 1) * cos
        singular = np.abs(denom) < 1e-6
        t = np.where(singular, 0.0, n * cos / np.where(singular, 1.0, denom))
    coefs = np.concatenate([(1.0 - t)[:, None], np.repeat((t / n)[:, None], n, axis=1)], axis=1)
    return native_combine(x, coefs, groups)


METHOD = MergeMethod(
    name="model_stock",
    pretty_name="Model Stock",
    paper_url="https://arxiv.org/abs/2403.19522",
    compute=TorchFunction(merge, working_copies=(1.5, 0.75), native=native),  # measured: memory.py
    global_params=(
        ParamSpec(
            "filter_wise",
            bool,
            default=False,
            help="compute the ratio per row rather than per tensor (not recommended)",
        ),
    ),
    base="required",
    min_models=2,
    description="Moves the average of the fine-tuned models towards the base by a ratio from the angle between their task vectors.",
)
