"""Karcher mean: the Riemannian (geodesic) mean of the models' directions on the unit sphere,
scaled by their mean norm.

With ``N`` tensors ``x_i`` (flattened), norms ``n_i`` and unit vectors ``u_i`` (alpha = 1/N each;
vectors with ``n_i <= tol`` take no part in the direction and the alphas of the others are
renormalized):
    u <- normalize(sum_i alpha_i u_i)
    repeat at most max_iter times:
        theta_i = arccos(u.u_i)
        T = sum_{theta_i >= tol} alpha_i theta_i / sin(theta_i) (u_i - cos(theta_i) u)
        stop when |T| < tol
        u <- normalize(cos|T| u + sin|T| T/|T|)
    out = (sum_i n_i / N) * u          (mean norm over all inputs)

The fixed point satisfies sum_i alpha_i log_u(u_i) = 0, i.e. u minimizes the sum of squared
geodesic distances. For two inputs it is the slerp midpoint of their directions. Per-model
weights are not used. Computed in float32 (angles in float64).

Defined results where the mean is not unique or undefined (mergekit divides by sin(pi) or
returns zeros there): when the initial mean direction vanishes (antipodal or otherwise
cancelling directions) or every input is (near) zero, the result is the arithmetic mean
``sum_i x_i / N``; an input antipodal to the current estimate is left out of that step.
"""

from __future__ import annotations

import math

from ._geometric import WHOLE, f32, finish, native_combine, native_gram, native_trivial, trivial
from .base import MergeInputs, MergeMethod, NativeInputs, ParamSpec, TorchFunction


def merge(inputs: MergeInputs):
    import torch

    done = trivial(inputs)
    if done is not None:
        return done
    shape = inputs.tensors[0].shape
    xs = [f32(x).reshape(-1) for x in inputs.tensors]
    if len(xs) == 1:
        return finish(xs[0].reshape(shape), inputs)
    max_iter, tol = int(inputs.params["max_iter"]), float(inputs.params["tol"])
    n = len(xs)
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    valid = [i for i in range(n) if norms[i] > tol]

    def arithmetic_mean():
        return finish((torch.stack(xs).sum(dim=0) / n).reshape(shape), inputs)

    if not valid:
        return arithmetic_mean()
    alphas = [1.0 / len(valid)] * len(valid)
    units = [xs[i] / norms[i] for i in valid]
    u = sum(a * ui for a, ui in zip(alphas, units))
    norm_u = float(torch.linalg.vector_norm(u))
    if norm_u < tol:
        return arithmetic_mean()
    u = u / norm_u
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for a, ui in zip(alphas, units):
            dot = min(1.0, max(-1.0, float(torch.dot(u, ui))))
            theta = math.acos(dot)
            sin = math.sin(theta)
            if theta < tol or sin < 1e-7:
                continue  # already there, or antipodal (no unique direction towards it)
            tangent += (a * theta / sin) * (ui - dot * u)
        norm_t = float(torch.linalg.vector_norm(tangent))
        if norm_t < tol:
            break
        u = math.cos(norm_t) * u + (math.sin(norm_t) / norm_t) * tangent
        u = u / torch.linalg.vector_norm(u)
    scale = sum(norms) / n
    return finish((scale * u).reshape(shape), inputs)


def native(x: NativeInputs):
    """``merge`` on CPU: the mean direction ``u`` is kept as coefficients ``c`` with
    ``u = sum_i c_i x_i``, its dots and norms read off the inputs' Gram matrix (float64)."""
    import numpy as np

    done = native_trivial(x)
    if done is not None:
        return done
    n = len(x.inputs)
    if n == 1:
        return native_combine(x, [1.0])
    max_iter, tol = int(x.params["max_iter"]), float(x.params["tol"])
    gram = native_gram(x, list(range(n)), None, WHOLE)[0]
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return native_combine(x, np.full(n, 1.0 / n))

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ gram @ c), 0.0))

    alpha = 1.0 / len(valid)
    unit = [np.eye(n)[i] / norms[i] for i in valid]  # u_i as coefficients
    u = alpha * sum(unit)
    norm_u = norm(u)
    if norm_u < tol:
        return native_combine(x, np.full(n, 1.0 / n))
    u = u / norm_u
    for _ in range(max_iter):
        tangent = np.zeros(n)
        g_u = gram @ u
        for ui in unit:
            dot = min(1.0, max(-1.0, float(ui @ g_u)))
            theta = math.acos(dot)
            sin = math.sin(theta)
            if theta < tol or sin < 1e-7:
                continue
            tangent += (alpha * theta / sin) * (ui - dot * u)
        norm_t = norm(tangent)
        if norm_t < tol:
            break
        u = math.cos(norm_t) * u + (math.sin(norm_t) / norm_t) * tangent
        u = u / norm(u)
    return native_combine(x, (norms.sum() / n) * u)


METHOD = MergeMethod(
    name="karcher",
    pretty_name="Karcher Mean",
    paper_url="https://en.wikipedia.org/wiki/Karcher_mean",
    compute=TorchFunction(merge, working_copies=(2.0, 0.25), native=native),  # measured: memory.py
    global_params=(
        ParamSpec("max_iter", int, default=10, minimum=0, help="maximum number of iterations"),
        ParamSpec("tol", float, default=1e-5, minimum=0.0, help="convergence tolerance"),
    ),
    base="ignored",
    min_models=1,
    description="Geodesic mean of the models' directions on the sphere, scaled by their mean norm.",
)
