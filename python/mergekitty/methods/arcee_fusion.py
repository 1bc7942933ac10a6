"""Arcee Fusion: keep the other model's values only where they change the base the most.

With base ``B`` and the other model ``X``:
    KL = sum p log(p / q),  p = softmax(X) + 1e-8,  q = softmax(B) + 1e-8   (along the last axis,
                                                                           one value per row)
    I = |X - B| * KL                                                        importance
    tau = median(I) + 1.5 (Q3(I) - Q1(I))
    out = X where I >= tau, else B

Quantiles are order statistics of all elements: median = sorted[(n-1)//2], Q1 =
sorted[int(0.25 (n-1))], Q3 = sorted[int(0.75 (n-1))]. mergekit estimates them from a random
subsample of 1e6 elements for larger tensors, so its result is nondeterministic there; here
they are exact (identical to mergekit for tensors of at most 1e6 elements). Computed in
float32, the KL in float64 (mergekit: in the input dtype); selected elements are copied, not
recomputed as B + (X - B).
"""

from __future__ import annotations

from ..errors import MergeError
from ._geometric import f32, finish, native_trivial, trivial
from .base import MergeInputs, MergeMethod, NativeInputs, TorchFunction


def order_statistic(flat, index: int):
    """``sorted(flat)[index]`` (0-based)."""
    import torch

    return torch.kthvalue(flat, index + 1).values


def row_kl(x, b):
    """KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) of every row (vector along the last axis),
    shape ``[..., 1]``, float32. Computed in float64 a block of rows at a time: the KL of two
    close distributions is a small difference of larger terms, which float32 gets wrong by
    ~1e-3 (relative) on fine-tuned weights."""
    import torch

    n = x.shape[-1]
    xr, br = x.reshape(-1, n), b.reshape(-1, n)
    out = torch.empty(xr.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(n, 1))
    for i in range(0, xr.shape[0], step):
        p = torch.softmax(xr[i : i + step].double(), dim=-1) + 1e-8
        q = torch.softmax(br[i : i + step].double(), dim=-1) + 1e-8
        out[i : i + step] = (p * torch.log(p / q)).sum(dim=-1)
    return out.to(torch.float32).reshape(*x.shape[:-1], 1)


def merge(inputs: MergeInputs):
    import torch

    done = trivial(inputs)
    if done is not None:
        return done
    if inputs.base is None or len(inputs.tensors) != 1:
        raise MergeError(f"tensor '{inputs.name}': arcee_fusion needs a base model and exactly one other model")
    b, x = f32(inputs.base), f32(inputs.tensors[0])
    importance = (x - b).abs() * row_kl(x, b)
    flat = importance.reshape(-1)
    n = flat.numel()
    median = order_statistic(flat, (n - 1) // 2)
    q1 = order_statistic(flat, int(0.25 * (n - 1)))
    q3 = order_statistic(flat, int(0.75 * (n - 1)))
    tau = median + 1.5 * (q3 - q1)
    return finish(torch.where(importance >= tau, x, b), inputs)


def native(x: NativeInputs):
    """``merge`` on CPU from the memory maps (rust/src/kernels/arcee_fusion.rs): the row KL and
    the importance in one float32 scratch copy, its three order statistics, then the selection."""
    from .. import _native

    done = native_trivial(x)
    if done is not None:
        return done
    if not x.has_base or x.models != 1:
        raise MergeError(f"tensor '{x.name}': arcee_fusion needs a base model and exactly one other model")
    (b, x1), (bd, xd) = x.inputs, x.dtypes
    row_len = x.shape[-1] if x.shape else 1
    return _native.arcee_fusion_merge(b, bd, x1, xd, row_len, x.out, x.out_dtype, x.threads)


METHOD = MergeMethod(
    name="arcee_fusion",
    pretty_name="Arcee Fusion",
    paper_url="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
    compute=TorchFunction(merge, working_copies=(1.5, 0.5), native=native, native_copies=1.0),  # measured: memory.py
    base="required",
    min_models=1,
    max_models=1,
    description="Takes the other model's values only where their KL-weighted change from the base is an outlier. Exactly one model besides the base.",
)
