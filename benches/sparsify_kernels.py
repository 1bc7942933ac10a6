#!/usr/bin/env python3
"""Micro-benchmark: native sparsify / consensus kernels vs. their torch references.

For each shape (a float32 task vector) and thread count it times, as medians:
- native: the in-place kernel on a float32 scratch copy (the copy is refreshed, untimed, before
  every run) — `_native.magnitude`, `magnitude_outliers`, `random_mask`, `della`, `combine`;
- torch: the reference in `mergekitty.ops.{sparsify,consensus}` (`*_reference`) with
  torch.set_num_threads(threads);
and reports the ratio torch/native and whether the outputs agree.

`combine` merges 3 task vectors with TIES sign consensus into a bf16 base and writes bf16
(`out = base + lambda * M`), against the reference `base.float() + lambda * combine_reference(...)`.
`gta_ties` is a whole TIES merge of 3 bf16 models in one native call
(`ops.native_dispatch.gta_merge`: magnitude thresholds, then sparsify + consensus + base), against
the same merge through the torch references.
`task_vector_stats` is the figures of `mergekitty inspect` for one tensor (a bf16 base and 3 bf16
fine-tunes: norms, pairwise dots and sign agreement, TIES kept energy at --density) in one native
call, against `ops.task_vector_stats.task_vector_stats_reference`; its parity is the number of
integer sums that differ and the largest relative difference of the float sums.

Usage:
    python benches/sparsify_kernels.py
    python benches/sparsify_kernels.py --shapes 5632x2048 --threads 1,2 --repeat 3 --kernels magnitude,della
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

KERNELS = (
    "uniform",
    "magnitude",
    "magnitude_outliers",
    "random_mask",
    "della",
    "combine",
    "gta_ties",
    "task_vector_stats",
)
SEED, KEY = 1234, "model.layers.0.mlp.up_proj.weight#1"


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s]


def timeit(fn, repeat: int, warmup: int, setup=None) -> list[float]:
    times = []
    for r in range(warmup + repeat):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t)
    return times


def same(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    eq = (a == b) | (a.isnan() & b.isnan())
    diff = (a - b).abs()
    return {"mismatches": int((~eq).sum()), "max_abs": float(diff[~eq].max()) if (~eq).any() else 0.0}


def same_stats(got: dict, want: dict) -> dict:
    """Integer sums that differ, and the largest relative difference of the float sums."""
    mismatches, worst = 0, 0.0
    for key, w in want.items():
        g = got[key]
        for a, b in zip(g if isinstance(g, list) else [g], w if isinstance(w, list) else [w]):
            if isinstance(b, int):
                mismatches += a != b
            else:
                worst = max(worst, abs(a - b) / max(abs(b), 1e-30))
    return {"mismatches": mismatches, "max_abs": worst}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="32000x2048,5632x2048")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write results here (default: benches/work/sparsify-kernels-<timestamp>.json)",
    )
    args = ap.parse_args(argv)

    try:
        from mergekitty import _native
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
        from mergekitty import _native
    print(f"[native] {_native.__file__}")
    from mergekitty.ops import random as R
    from mergekitty.ops import sparsify as S

    try:
        from mergekitty.ops import consensus as C
    except ImportError:
        C = None

    kernels = [k for k in args.kernels.split(",") if k]
    threads_list = [int(t) for t in args.threads.split(",") if t]
    d = args.density
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in parse_shapes(args.shapes):
        x = torch.randn(shape, generator=gen).mul_(0.002)
        rows, row_len = x.numel() // shape[-1], shape[-1]
        scratch = torch.empty_like(x)
        buf = scratch.view(-1).numpy()
        deltas = [torch.randn(shape, generator=gen).mul_(0.002) for _ in range(3)]
        weights = [0.5, 0.3, 0.2]
        base = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
        out = torch.empty(shape, dtype=torch.bfloat16)

        def refresh():
            scratch.copy_(x)

        cases = {
            "uniform": (
                lambda t: _native.uniform(SEED, KEY, 0, buf),
                lambda: R.uniform(SEED, KEY, x.numel()).view(shape),
                None,
            ),
            "magnitude": (lambda t: _native.magnitude(buf, d, False, t), lambda: S.magnitude_reference(x, d), refresh),
            "magnitude_outliers": (
                lambda t: _native.magnitude_outliers(buf, d, 0.01, False, t),
                lambda: S.magnitude_outliers_reference(x, d, 0.01),
                refresh,
            ),
            "random_mask": (
                lambda t: _native.random_mask(buf, d, SEED, KEY, "inverse", t),
                lambda: S.random_mask_reference(x, d, SEED, KEY, "inverse"),
                refresh,
            ),
            "della": (
                lambda t: _native.della(buf, rows, row_len, d, 0.1, SEED, KEY, "inverse", t),
                lambda: S.della_reference(x, d, 0.1, SEED, KEY, "inverse"),
                refresh,
            ),
        }
        if C is not None:
            ob = out.view(-1).view(torch.uint8).numpy()
            bb = base.view(-1).view(torch.uint8).numpy()
            dbs = [t.view(-1).numpy() for t in deltas]
            cases["combine"] = (
                lambda t: _native.combine(dbs, weights, True, True, 1.0, bb, "BF16", ob, "BF16", t),
                lambda: (base.float() + 1.0 * C.combine_reference(deltas, weights, True, True)).to(torch.bfloat16),
                None,
            )
        if C is not None:
            from mergekitty.kernels import GtaSpec, Sparsity
            from mergekitty.ops import native_dispatch as N

            models = [(base.float() + t).to(torch.bfloat16) for t in deltas]
            spec = GtaSpec((Sparsity("magnitude", d),) * 3, tuple(weights), True, True, 1.0)

            def ties_reference():
                ds = [S.magnitude_reference(m.float() - base.float(), d) for m in models]
                return (base.float() + C.combine_reference(ds, weights, True, True)).to(torch.bfloat16)

            cases["gta_ties"] = (
                lambda t: N.gta_merge(models, base, spec, SEED, torch.bfloat16, out=out),
                ties_reference,
                None,
            )
        from mergekitty.ops.task_vector_stats import task_vector_stats_reference

        tvs_models = [(base.float() + t).to(torch.bfloat16) for t in deltas]
        tvs_views = [t.view(-1).view(torch.uint8).numpy() for t in (base, *tvs_models)]
        tvs_scratch = torch.empty(x.numel(), dtype=torch.float32).numpy()
        tvs_result: dict = {}

        def tvs_native(t):
            tvs_result.update(
                _native.task_vector_stats(tvs_views[0], "BF16", tvs_views[1:], ["BF16"] * 3, d, tvs_scratch, t)
            )

        cases["task_vector_stats"] = (tvs_native, lambda: task_vector_stats_reference(base, tvs_models, d), None)
        for name in kernels:
            if name not in cases:
                print(f"[skip] {name}: no reference available")
                continue
            nat, ref, setup = cases[name]
            for threads in threads_list:
                torch.set_num_threads(threads)
                t_torch = timeit(ref, args.repeat, args.warmup)
                t_nat = timeit(lambda: nat(threads), args.repeat, args.warmup, setup)
                want = ref()
                if setup is not None:
                    setup()
                nat(threads)
                got = out if name in ("combine", "gta_ties") else scratch
                parity = same_stats(tvs_result, want) if name == "task_vector_stats" else same(got, want)
                row = {
                    "kernel": name,
                    "shape": list(shape),
                    "threads": threads,
                    "torch_median_s": statistics.median(t_torch),
                    "native_median_s": statistics.median(t_nat),
                    "torch_times_s": t_torch,
                    "native_times_s": t_nat,
                    "parity": parity,
                }
                row["speedup"] = row["torch_median_s"] / row["native_median_s"]
                results.append(row)
                print(
                    f"{name:>18} {'x'.join(map(str, shape)):>10} threads={threads}: "
                    f"torch {row['torch_median_s'] * 1e3:9.1f} ms | native {row['native_median_s'] * 1e3:8.1f} ms"
                    f" | speedup {row['speedup']:6.2f}x | mismatches {row['parity']['mismatches']}"
                    f" (max abs {row['parity']['max_abs']:.3g})",
                    flush=True,
                )
        del x, scratch, buf, deltas, base, out, tvs_models, tvs_views, tvs_scratch

    from kernels import write_report  # benches/kernels.py: the script's folder is on sys.path

    path = write_report(results, args.json, "sparsify-kernels")
    print(f"speedup = torch reference median / native median. load avg {os.getloadavg()[0]:.1f}. results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
