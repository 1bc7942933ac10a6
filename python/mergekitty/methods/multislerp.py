"""Multi-SLERP: spherical interpolation of any number of models, optionally around a base.

Vectors ``x_i`` are the flattened tensors, or the task vectors ``X_i - B`` when a base model is
given (the base is added back at the end). With weights ``w_i`` (divided by their sum when
``normalize_weights``; left as they are when the sum is 0):
    u_i = x_i / (|x_i| + eps)                   unit vectors
    m = sum_i w_i u_i,  m^ = m / |m|            weighted mean direction
    T = sum_i w_i (u_i - (u_i.m^) m^)           tangent vectors at m^, combined
    r = m^ cos|T| + T sin|T| / |T|              exponential map (|T| taken as norm + eps)
    out = r * sum_i w_i |x_i|                   (+ B)
(T is the component of m orthogonal to m^, i.e. zero up to rounding, so the result is the
weighted mean direction scaled by the weighted mean norm.) One input is returned unchanged.

Computed in float32. When the mean direction vanishes (|m| < eps: antipodal inputs, or all
zero vectors) the result is the linear combination ``sum_i w_i x_i`` (+ B) for any number of
inputs; mergekit does this for two inputs and raises for more.
"""

from __future__ import annotations

import math

from ..ops.consensus import NORMALIZE_EPS
from ._geometric import WHOLE, f32, finish, native_combine, native_gram, native_trivial, trivial
from .base import MergeInputs, MergeMethod, NativeInputs, ParamSpec, TorchFunction


def merge(inputs: MergeInputs):
    import torch

    done = trivial(inputs)
    if done is not None:
        return done
    if len(inputs.tensors) == 1:
        return finish(f32(inputs.tensors[0]), inputs)
    p = inputs.params
    eps = float(p["eps"])
    shape = inputs.tensors[0].shape
    base = f32(inputs.base).reshape(-1) if inputs.base is not None else None
    xs = torch.stack([f32(x).reshape(-1) - base if base is not None else f32(x).reshape(-1) for x in inputs.tensors])
    w = [float(mp["weight"]) for mp in inputs.model_params]
    if p["normalize_weights"] and abs(sum(w)) >= NORMALIZE_EPS:
        total = sum(w)
        w = [wi / total for wi in w]
    wt = torch.tensor(w, dtype=torch.float32, device=xs.device).unsqueeze(-1)
    norms = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    units = xs / torch.where(norms > 0, norms + eps, torch.ones_like(norms))  # a zero vector stays zero
    mean = (units * wt).sum(dim=0)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if not (mean_norm > 0 and mean_norm >= eps):
        result = (xs * wt).sum(dim=0)
    else:
        mean = mean / mean_norm
        dots = units @ mean
        tangent = ((units - dots.unsqueeze(-1) * mean) * wt).sum(dim=0)
        tn = float(torch.linalg.vector_norm(tangent)) + eps
        result = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
        result = result * float((norms.squeeze(-1) * wt.squeeze(-1)).sum())
    if base is not None:
        result = result + base
    return finish(result.reshape(shape), inputs)


def native(x: NativeInputs):
    """``merge`` on CPU: every vector above is a combination ``sum_i a_i x_i`` of the inputs, so
    the formulas run on coefficient vectors with norms and dots read off the Gram matrix."""
    import numpy as np

    done = native_trivial(x)
    if done is not None:
        return done
    first = int(x.has_base)
    if x.models == 1:
        return native_combine(x, [0.0] * first + [1.0])
    eps = float(x.params["eps"])
    models = list(range(first, len(x.inputs)))
    gram = native_gram(x, models, 0 if x.has_base else None, WHOLE)[0]
    w = np.array([float(mp["weight"]) for mp in x.model_params])
    if x.params["normalize_weights"] and abs(w.sum()) >= NORMALIZE_EPS:
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    unit = np.where(norms > 0, 1.0 / np.where(norms > 0, norms + eps, 1.0), 0.0)  # u_i = unit_i x_i

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ gram @ c), 0.0))

    mean = w * unit
    mean_norm = norm(mean)
    if not (mean_norm > 0 and mean_norm >= eps):
        coefs = w
    else:
        mean = mean / mean_norm
        dots = (gram @ mean) * unit  # u_i . m^
        tangent = w * unit - float(w @ dots) * mean
        tn = norm(tangent) + eps
        coefs = (mean * math.cos(tn) + tangent * (math.sin(tn) / tn)) * float(norms @ w)
    if x.has_base:  # B + sum_i c_i (X_i - B)
        coefs = np.concatenate([[1.0 - coefs.sum()], coefs])
    return native_combine(x, coefs)


METHOD = MergeMethod(
    name="multislerp",
    pretty_name="Multi-SLERP",
    paper_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    compute=TorchFunction(merge, working_copies=(2.5, 0.5), native=native),  # measured: memory.py
    global_params=(
        ParamSpec("normalize_weights", bool, default=True, help="divide the weights by their sum"),
        ParamSpec("eps", float, default=1e-8, minimum=0.0, help="added to norms to avoid division by zero"),
    ),
    model_params=(ParamSpec("weight", float, required=True, help="weight of this model"),),
    base="optional",
    min_models=1,
    description="Spherical interpolation of any number of models (or of their task vectors around a base).",
)
