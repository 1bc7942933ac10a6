"""SCE (arXiv:2408.07990): Select, Calculate, Erase -- task vectors merged with weights from
their own magnitudes, after keeping the most contentious positions and a TIES sign election.

With base ``B`` and task vectors ``d_i = X_i - B`` (``N`` models):
1. Select (only when ``select_topk < 1`` and N >= 2): ``var = Var_i(d_i)`` elementwise
   (population variance); ``k = int(select_topk * count_nonzero(var))``; every d_i keeps the k
   positions of largest variance and is zero elsewhere (k = 0: all zero, the result is B).
   Ties at the k-th value are broken by position (lowest index first), so exactly k are kept.
2. Calculate: ``w_i = mean(d_i^2) / sum_j mean(d_j^2)`` (1/N each when the sum is 0).
3. Erase: ``sigma = +1 where sum_i d_i >= 0 else -1`` (unweighted TIES "sum" election);
   ``m_i = [sign(d_i) == sigma]`` (a zero d_i never counts).
4. ``out = B + sum_i w_i m_i d_i / sum_i w_i m_i`` (0 where no model counts).

Computed in float32. Per-model ``weight`` is not used (as in the paper and mergekit).
``int8_mask`` is accepted for compatibility and has no effect. Choices where the existing tools
differ or break: with a single model the selection step is skipped (its variance is 0
everywhere, which would erase the whole task vector); a zero weight sum is tested exactly
(mergekit uses 1e-6, which makes weights uniform for small task vectors) and the
denominator is exact, never clamped. The sign election is written here rather than taken
from ``ops.consensus.combine`` because SCE elects on the unweighted task vectors while
``combine`` elects on the weighted ones.
"""

from __future__ import annotations

from ..errors import MergeError
from ._geometric import f32, finish, native_trivial, trivial
from .base import MergeInputs, MergeMethod, NativeInputs, ParamSpec, TorchFunction


def topk_mask(score, k: int):
    """Boolean mask of the ``k`` largest entries of ``score``; ties broken by lowest flat index."""
    import torch

    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    thr = torch.kthvalue(flat, n - k + 1).values
    keep = flat > thr
    need = k - int(keep.sum())
    eq = flat == thr
    keep |= eq & (eq.cumsum(0) <= need)
    return keep.reshape(score.shape)


def merge(inputs: MergeInputs):
    import torch

    done = trivial(inputs)
    if done is not None:
        return done
    if inputs.base is None:
        raise MergeError(f"tensor '{inputs.name}': sce needs a base model")
    base = f32(inputs.base)
    deltas = torch.stack([f32(x) - base for x in inputs.tensors])
    n = deltas.shape[0]
    topk = float(inputs.params["select_topk"])
    if topk < 1.0 and n >= 2:
        var = deltas.var(dim=0, unbiased=False)
        k = int(topk * int(torch.count_nonzero(var)))
        deltas = deltas * topk_mask(var, k).unsqueeze(0)
    ms = deltas.reshape(n, -1).pow(2).mean(dim=1)
    total = float(ms.sum())
    weights = ms / total if total > 0 else torch.full_like(ms, 1.0 / n)
    sigma = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    counts = (torch.sign(deltas) == sigma.unsqueeze(0)).to(torch.float32)
    w = weights.reshape(n, *([1] * (deltas.dim() - 1))) * counts
    num = (w * deltas).sum(dim=0)
    den = w.sum(dim=0)
    merged = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return finish(base + merged, inputs)


def native(x: NativeInputs):
    """``merge`` on CPU from the memory maps (rust/src/kernels/sce.rs): the variance's order
    statistic in one float32 scratch copy of the tensor, then the weights and the election."""
    from .. import _native

    done = native_trivial(x)
    if done is not None:
        return done
    if not x.has_base:
        raise MergeError(f"tensor '{x.name}': sce needs a base model")
    return _native.sce_merge(
        x.inputs[0], x.dtypes[0], x.inputs[1:], x.dtypes[1:], float(x.params["select_topk"]),
        x.out, x.out_dtype, x.threads,
    )  # fmt: skip


METHOD = MergeMethod(
    name="sce",
    pretty_name="SCE",
    paper_url="https://arxiv.org/abs/2408.07990",
    compute=TorchFunction(
        merge,
        working_copies=(3.5, 1.75),
        native=native,
        # the selection's float32 variance, only when it selects
        native_copies=lambda params: 1.0 if float(params["select_topk"]) < 1.0 else 0.0,
    ),  # measured: memory.py
    global_params=(
        ParamSpec(
            "select_topk",
            float,
            default=1.0,
            minimum=0.0,
            maximum=1.0,
            help="fraction of the positions with the highest variance across task vectors to keep",
        ),
        ParamSpec("int8_mask", bool, default=False, help="accepted for compatibility; no effect"),
    ),
    base="required",
    min_models=1,
    description="Keeps high-variance positions, weights task vectors by their energy and erases minority signs.",
)
