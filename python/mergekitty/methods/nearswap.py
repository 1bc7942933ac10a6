"""NearSwap: take the other model's value where it is close to the base, keep the base where
they differ a lot, and interpolate in between.

With base ``B``, the other model ``X`` and threshold ``t``, elementwise:
    w = clamp(t / |B - X|, 0, 1)          (w = 1 where B == X)
    out = w * X + (1 - w) * B

So elements with ``|B - X| <= t`` are taken from ``X``; farther ones move ``t / |B - X|`` of the
way. ``t = 0`` returns the base. Computed in float32. (mergekitty 0.x rejected t <= 0 and
mergekit clamps |B - X| to >= 1e-6; where B == X every choice gives the same value.)
"""

from __future__ import annotations

from ..errors import MergeError
from ._geometric import f32, finish, native_trivial, trivial
from .base import MergeInputs, MergeMethod, NativeInputs, ParamSpec, TorchFunction


def merge(inputs: MergeInputs):
    import torch

    done = trivial(inputs)
    if done is not None:
        return done
    if inputs.base is None or len(inputs.tensors) != 1:
        raise MergeError(f"tensor '{inputs.name}': nearswap needs a base model and exactly one other model")
    b, x = f32(inputs.base), f32(inputs.tensors[0])
    t = float(inputs.params["t"])
    diff = (b - x).abs()
    w = torch.where(
        diff > 0, (t / torch.where(diff > 0, diff, torch.ones_like(diff))).clamp(0.0, 1.0), torch.ones_like(diff)
    )
    return finish(w * x + (1.0 - w) * b, inputs)


def native(x: NativeInputs):
    """``merge`` on CPU from the memory maps: one elementwise pass (rust/src/kernels/nearswap.rs)."""
    from .. import _native

    done = native_trivial(x)
    if done is not None:
        return done
    if not x.has_base or x.models != 1:
        raise MergeError(f"tensor '{x.name}': nearswap needs a base model and exactly one other model")
    (b, x1), (bd, xd) = x.inputs, x.dtypes
    return _native.nearswap_merge(b, bd, x1, xd, float(x.params["t"]), x.out, x.out_dtype, x.threads)


METHOD = MergeMethod(
    name="nearswap",
    pretty_name="NearSwap",
    paper_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    compute=TorchFunction(merge, working_copies=(2.0, 0.75), native=native),  # measured: memory.py
    global_params=(
        ParamSpec(
            "t",
            float,
            required=True,
            minimum=0.0,
            help="similarity threshold: differences up to t take the other model's value",
        ),
    ),
    base="required",
    min_models=1,
    max_models=1,
    description="Takes the other model's values where they are within t of the base, interpolating farther ones. Exactly one model besides the base.",
)
