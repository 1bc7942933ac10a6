#!/usr/bin/env python3
"""Micro-benchmark: every merge method's native CPU function against its torch function.

For each registered method whose computation has a native function (``TorchFunction.native``:
slerp/nuslerp, multislerp, karcher, model_stock, and the elementwise methods), one tensor of
``--shape`` in bfloat16 (a base and ``--inputs`` fine-tunes, or as many as the method takes) is
merged by both, from raw bytes (the native function, as the executor calls it) and from torch
tensors (the reference), at each thread count. Reported: median time, effective bandwidth
(input + output bytes over the time), the torch/native speedup, and the largest difference of
the two results relative to the result's scale.

Usage:
    python benches/methods.py
    python benches/methods.py --shape 8192x4096 --threads 1,2 --repeat 5 --methods slerp,model_stock
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from mergekitty.methods.base import MergeInputs, NativeInputs, TorchFunction
from mergekitty.methods.registry import all_methods

# the parameters each method is benchmarked with (its defaults fill the rest)
PARAMS: dict[str, dict] = {
    "slerp": {"t": 0.3},
    "sce": {"select_topk": 0.5},
    "nearswap": {"t": 0.01},
}
WEIGHTS = (0.5, 0.3, 0.2, 0.4)


def _params(method, models: int) -> tuple[dict, list[dict]]:
    params = {p.name: p.default for p in method.global_params}
    params.update(PARAMS.get(method.name, {}))
    mps = [{p.name: p.default for p in method.model_params} for _ in range(models)]
    for mp, w in zip(mps, WEIGHTS):
        if "weight" in mp:
            mp["weight"] = w
    return params, mps


def _models(method, wanted: int) -> int:
    if method.name == "slerp":
        return 1  # 't' interpolates the base and one model
    return min(wanted, method.max_models or wanted)


def bench(method, shape: tuple[int, ...], inputs: int, threads: int, repeat: int) -> dict:
    n = _models(method, inputs)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).bfloat16()
    xs = [(base.float() + 0.01 * torch.randn(shape, generator=g)).bfloat16() for _ in range(n)]
    has_base = method.base != "ignored"
    job = ([base] if has_base else []) + xs
    params, mps = _params(method, n)
    numel = math.prod(shape)
    out = np.empty(numel * 2, dtype=np.uint8)
    compute = method.compute
    assert isinstance(compute, TorchFunction) and compute.native is not None

    def native():
        compute.native(
            NativeInputs(
                method.name,
                [t.reshape(-1).view(torch.uint8).numpy() for t in job],
                ["BF16"] * len(job),
                has_base,
                shape,
                params,
                mps,
                out,
                "BF16",
                threads,
            )
        )

    def reference():
        return method.merge(
            MergeInputs(
                method.name,
                xs if has_base else job,
                mps,
                params,
                base=base if has_base else None,
                out_dtype=torch.bfloat16,
            )
        )

    torch.set_num_threads(threads)
    times = {}
    for name, fn in (("native", native), ("torch", reference)):
        fn()
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    ref = reference().float()
    got = torch.frombuffer(out, dtype=torch.bfloat16).float().reshape(shape)
    scale = float(ref.abs().max()) or 1.0
    moved = (len(job) + 1) * numel * 2
    return {
        "method": method.name,
        "inputs": len(job),
        "threads": threads,
        "native_s": times["native"],
        "torch_s": times["torch"],
        "native_GBps": moved / times["native"] / 1e9,
        "speedup": times["torch"] / times["native"],
        "max_rel_diff": float((got - ref).abs().max()) / scale,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--inputs", type=int, default=3, help="fine-tunes besides the base (at most what a method takes)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--methods", default="", help="comma-separated subset (default: every method with a native function)"
    )
    args = ap.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x"))
    wanted = {m for m in args.methods.split(",") if m}
    methods = [
        m
        for m in all_methods()
        if isinstance(m.compute, TorchFunction) and m.compute.native is not None and (not wanted or m.name in wanted)
    ]
    print(f"shape {args.shape} bf16, median of {args.repeat}")
    print(
        f"{'method':14} {'in':>3} {'thr':>3} {'native s':>9} {'torch s':>9} {'GB/s':>6} {'speedup':>8} {'max rel diff':>13}"
    )
    for m in methods:
        for threads in (int(t) for t in args.threads.split(",")):
            r = bench(m, shape, args.inputs, threads, args.repeat)
            print(
                f"{r['method']:14} {r['inputs']:3} {r['threads']:3} {r['native_s']:9.4f} {r['torch_s']:9.4f} "
                f"{r['native_GBps']:6.2f} {r['speedup']:8.1f} {r['max_rel_diff']:13.2e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
