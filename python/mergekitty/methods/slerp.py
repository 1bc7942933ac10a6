"""SLERP: spherical linear interpolation of two models (also named ``nuslerp``).

Two ways to say how far to go, exactly one of which is used:

- global ``t`` (classic SLERP): interpolates the base model ``B`` and the one other model ``X``:
      out = slerp(t, B, X)
  ``t = 0`` returns the base and ``t = 1`` the other model, whatever the order in which they
  are listed (mergekitty 0.x gave weight ``1-t`` to the first *listed* model instead).
  When ``t`` is given, per-model ``weight``s are ignored.
- per-model ``weight`` (NuSLERP): two models ``X1, X2`` (config order) besides the base, with
      t = w2 / (w1 + w2)            (0.5 when |w1 + w2| < 1e-6)
      out = slerp(t, X1, X2)                    without a base model
      out = B + slerp(t, X1 - B, X2 - B)        with one: SLERP of the task vectors

where, for vectors ``v0, v1`` with ``cos theta = v0.v1 / (|v0| |v1|)``,
      slerp(t, v0, v1) = sin((1-t) theta)/sin theta * v0 + sin(t theta)/sin theta * v1.

Which vectors: with ``nuslerp_flatten: true`` (default) each tensor is one vector. With
``nuslerp_flatten: false``, ``nuslerp_row_wise: true`` interpolates each row ``x[i, :]``
separately and ``nuslerp_row_wise: false`` each column ``x[:, j]``. (mergekit's nuslerp and
mergekitty 0.x did the opposite of these names: their ``row_wise: true`` interpolated columns.)
A 1-D tensor is always one vector.

Computed in float32. Degenerate pairs have a defined result, vector by vector: when
``|cos theta| > 0.9995`` (nearly parallel, where slerp and lerp agree to ~1e-4, or nearly
antipodal, where the arc is not unique) or either vector is zero, the result is the lerp
``(1-t) v0 + t v1``. The threshold is mergekit's classic one; mergekit's nuslerp and
mergekitty 0.x only fell back at ``|sin theta| < 1e-8`` in the input dtype, so their results
differ from these by up to ~1e-4 (relative) on nearly parallel vectors.
"""

from __future__ import annotations

from ..errors import MergeError
from ._geometric import (
    f32,
    finish,
    native_combine,
    native_gram,
    native_trivial,
    slerp_coefficients,
    slerp_tensors,
    trivial,
    vector_groups,
)
from .base import MergeInputs, MergeMethod, NativeInputs, ParamSpec, TorchFunction


def nuslerp_t(w1: float, w2: float) -> float:
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def validate(params, model_params) -> None:
    n = len(model_params)
    if params.get("t") is not None:
        if n > 1:
            raise ValueError(
                f"slerp with 't' interpolates the base model and one other model, got {n} models besides the base "
                "(set base_model to one of them, or give each model a 'weight' for NuSLERP)"
            )
        return
    if n == 0:
        return  # only the base: it passes through
    if n != 2:
        raise ValueError(
            "slerp with per-model 'weight' needs exactly two models besides the base model "
            "(to interpolate the base model and one other model, use the global 't')"
        )
    if any(p.get("weight") is None for p in model_params):
        raise ValueError("slerp needs either a global 't' or a 'weight' for each of the two models")


def merge(inputs: MergeInputs):
    done = trivial(inputs)
    if done is not None:
        return done
    p = inputs.params
    flatten, row_wise = bool(p["nuslerp_flatten"]), bool(p["nuslerp_row_wise"])
    if p.get("t") is not None:
        if inputs.base is None or len(inputs.tensors) != 1:
            raise MergeError(f"tensor '{inputs.name}': slerp with 't' needs a base_model and exactly one other model")
        result = slerp_tensors(float(p["t"]), f32(inputs.base), f32(inputs.tensors[0]), flatten, row_wise)
        return finish(result, inputs)
    if len(inputs.tensors) != 2:
        raise MergeError(
            f"tensor '{inputs.name}': slerp with per-model 'weight' needs two models besides the base, got {len(inputs.tensors)}"
        )
    t = nuslerp_t(float(inputs.model_params[0]["weight"]), float(inputs.model_params[1]["weight"]))
    x1, x2 = f32(inputs.tensors[0]), f32(inputs.tensors[1])
    if inputs.base is None:
        return finish(slerp_tensors(t, x1, x2, flatten, row_wise), inputs)
    b = f32(inputs.base)
    return finish(b + slerp_tensors(t, x1 - b, x2 - b, flatten, row_wise), inputs)


def native(x: NativeInputs):
    """``merge`` on CPU from the memory maps: the inputs' Gram matrices, then one weighted sum."""
    import numpy as np

    done = native_trivial(x)
    if done is not None:
        return done
    p = x.params
    groups = vector_groups(x.shape, bool(p["nuslerp_flatten"]), bool(p["nuslerp_row_wise"]))
    if p.get("t") is not None:
        if not x.has_base or x.models != 1:
            raise MergeError(f"tensor '{x.name}': slerp with 't' needs a base_model and exactly one other model")
        c0, c1 = slerp_coefficients(float(p["t"]), native_gram(x, [0, 1], None, groups))
        return native_combine(x, np.stack([c0, c1], axis=1), groups)
    if x.models != 2:
        raise MergeError(
            f"tensor '{x.name}': slerp with per-model 'weight' needs two models besides the base, got {x.models}"
        )
    t = nuslerp_t(float(x.model_params[0]["weight"]), float(x.model_params[1]["weight"]))
    if not x.has_base:
        c0, c1 = slerp_coefficients(t, native_gram(x, [0, 1], None, groups))
        return native_combine(x, np.stack([c0, c1], axis=1), groups)
    # B + slerp(t, X1 - B, X2 - B) = (1 - c0 - c1) B + c0 X1 + c1 X2
    c0, c1 = slerp_coefficients(t, native_gram(x, [1, 2], 0, groups))
    return native_combine(x, np.stack([1.0 - c0 - c1, c0, c1], axis=1), groups)


METHOD = MergeMethod(
    name="slerp",
    pretty_name="SLERP",
    paper_url="https://en.wikipedia.org/wiki/Slerp",
    compute=TorchFunction(merge, working_copies=(1.0, 0.5), native=native),  # measured: memory.py
    global_params=(
        ParamSpec(
            "t",
            float,
            default=None,
            minimum=0.0,
            maximum=1.0,
            help="interpolation factor: 0 is the base model, 1 the other model",
        ),
        ParamSpec(
            "nuslerp_flatten",
            bool,
            default=True,
            help="treat each tensor as one vector; false: interpolate rows or columns separately",
        ),
        ParamSpec(
            "nuslerp_row_wise",
            bool,
            default=False,
            help="with nuslerp_flatten false: interpolate rows (true) or columns (false)",
        ),
    ),
    model_params=(
        ParamSpec(
            "weight", float, default=None, help="NuSLERP: relative weight of each of the two models (when no 't')"
        ),
    ),
    base="optional",
    min_models=1,
    max_models=2,
    validate=validate,
    base_needed_for=lambda params: "'t' interpolates from the base model" if params.get("t") is not None else None,
    aliases=("nuslerp",),
    description="Spherical interpolation of two models (t), or of two models or task vectors by relative weight (NuSLERP).",
)
