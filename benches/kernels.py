#!/usr/bin/env python3
"""Micro-benchmark: native fused weighted sum vs. the torch reference.

Native:  mergekitty._native.weighted_sum(inputs, in_dtypes, weights, out, out_dtype, threads)
         inputs and out are numpy uint8 views of torch tensors (t.view(torch.uint8).numpy()).
Torch:   (w0 * a.float() + w1 * b.float() + w2 * c.float()).to(out_dtype)
         with torch.set_num_threads(threads).

For each shape and thread count it reports the median time, the effective bandwidth
(bytes of all inputs + bytes of the output, divided by the time; the torch reference moves more
than that through its float32 temporaries, which is the point), and the native/torch speedup.
It also compares the two outputs (bit-exact is expected when both accumulate in float32 in the
same order with round-to-nearest-even; an FMA-based kernel may differ by one ulp).

Usage:
    python benches/kernels.py
    python benches/kernels.py --threads 1,2,4 --repeat 15 --shapes 32000x2048,5632x2048

Merge-method kernels (``--methods nearswap,sce,sce_select,arcee_fusion``): the native kernels
of those methods (``_native.nearswap_merge``, ``sce_merge``, ``arcee_fusion_merge``) against the
methods' torch functions (``MergeMethod.merge``) on weight-like tensors (a base ~ N(0, 0.02) and
fine-tunes + N(0, 0.002)): nearswap with t = 1e-3, sce of three models with select_topk 1
(``sce``) and 0.5 (``sce_select``), arcee_fusion along the last axis. GB/s counts the input
bytes only (every input read once); the torch references are slow, so ``--method-repeat``
(default 3) sets their runs:
    python benches/kernels.py --methods nearswap,sce,sce_select,arcee_fusion --shapes 8192x4096 --threads 1,0

Before/after (``--ab BEFORE_PYTHON_DIR``): the native ``weighted_sum`` of ``--inputs`` tensors and
the native TIES ``gta_merge`` (a base and ``--inputs - 1`` fine-tunes, density 0.5) of the first
shape, timed alternately by two builds: a worker subprocess imports ``mergekitty`` from
BEFORE_PYTHON_DIR (a copy of another tree's ``python/`` with its ``_native`` built in place),
then one from this tree, then the other way round, ``--rounds`` times. The headline is the median
over rounds of after/before, which shares the machine's load between the two builds:
    python benches/kernels.py --ab /tmp/before/python --shapes 8192x4096 --inputs 4 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

WORK_DIR = Path(__file__).resolve().parent / "work"


def write_report(results: list, json_path: Path | None, stem: str, **extra: object) -> Path:
    """The results with the machine's state (time, cores, torch, load) as JSON, to ``json_path``
    or a new ``work/<stem>-<time>.json``; returns the path (sparsify_kernels.py writes through it too)."""
    report = {
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        **extra,
        "load_avg": os.getloadavg(),
        "results": results,
    }
    path = json_path or WORK_DIR / f"{stem}-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


WEIGHTS = (0.5, 0.3, 0.2)
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
GB = 1e9


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s]


def timeit(fn, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bit patterns mapped to integers that order like the floats (+0 and -0 both 0)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        bits, mask = t.view(torch.int16).long(), 0x7FFF
    else:
        bits, mask = t.view(torch.int32).long(), 0x7FFFFFFF
    mag = bits & mask
    return torch.where(bits < 0, -mag, mag)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Element mismatches and the largest distance in units in the last place (same dtype)."""
    diff = (_ordered(out) - _ordered(ref)).abs()
    return {
        "mismatches": int((diff != 0).sum()),
        "max_ulp": int(diff.max()),
        "max_abs": float((out.float() - ref.float()).abs().max()),
    }


def _worker(shape: tuple[int, ...], k: int, threads: int, repeat: int, warmup: int) -> dict:
    """Median seconds of the native weighted_sum and TIES gta_merge of the mergekitty on sys.path."""
    from mergekitty import _native
    from mergekitty.kernels import GtaSpec, Sparsity
    from mergekitty.ops.native_dispatch import gta_merge_views

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen).mul_(0.02)
    tensors = [base.to(torch.bfloat16)] + [
        (base + torch.randn(shape, generator=gen).mul_(0.002)).to(torch.bfloat16) for _ in range(k - 1)
    ]
    del base
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors]
    out = torch.empty(shape, dtype=torch.bfloat16).reshape(-1).view(torch.uint8).numpy()
    weights = [1.0 / k] * k
    spec = GtaSpec(tuple(Sparsity("magnitude", 0.5) for _ in range(k - 1)), tuple(weights[1:]), True, True, 1.0)
    times = {
        "weighted_sum": timeit(
            lambda: _native.weighted_sum(views, ["BF16"] * k, weights, out, "BF16", threads), repeat, warmup
        ),
        "gta_merge": timeit(
            lambda: gta_merge_views(
                views[1:], ["BF16"] * (k - 1), views[0], "BF16", shape, spec, 7, out, "BF16", threads
            ),
            repeat,
            warmup,
        ),
    }
    return {"native": _native.__file__, **{name: statistics.median(t) for name, t in times.items()}}


METHOD_CASES = {
    # case: (method, models besides the base, params)
    "nearswap": ("nearswap", 1, {"t": 1e-3}),
    "sce": ("sce", 3, {"select_topk": 1.0}),
    "sce_select": ("sce", 3, {"select_topk": 0.5}),
    "arcee_fusion": ("arcee_fusion", 1, {}),
}


def methods_main(args: argparse.Namespace) -> int:
    """Native method kernels vs. the methods' torch functions (see the module docstring)."""
    from mergekitty import _native
    from mergekitty.methods.base import MergeInputs
    from mergekitty.methods.registry import get_method

    cases = [c for c in args.methods.split(",") if c]
    unknown = [c for c in cases if c not in METHOD_CASES]
    if unknown:
        print(f"unknown --methods {unknown}; choose from {sorted(METHOD_CASES)}")
        return 2
    print(f"[native] {_native.__file__}")
    dt, code = TORCH_DTYPES[args.dtype], args.dtype
    results = []
    for shape in parse_shapes(args.shapes):
        gen = torch.Generator().manual_seed(0)
        base32 = torch.randn(shape, generator=gen).mul_(0.02)
        xs = [(base32 + torch.randn(shape, generator=gen).mul_(0.002)).to(dt) for _ in range(3)]
        base = base32.to(dt)
        del base32
        out = torch.empty(shape, dtype=dt)
        views = [t.reshape(-1).view(torch.uint8).numpy() for t in (base, *xs)]
        out_view = out.reshape(-1).view(torch.uint8).numpy()
        for case in cases:
            method, k, params = METHOD_CASES[case]
            nbytes = (k + 1) * base.numel() * base.element_size()

            def run_native(threads: int, method=method, k=k, params=params) -> None:
                if method == "nearswap":
                    _native.nearswap_merge(views[0], code, views[1], code, params["t"], out_view, code, threads)
                elif method == "sce":
                    _native.sce_merge(
                        views[0], code, views[1 : k + 1], [code] * k, params["select_topk"], out_view, code, threads
                    )
                else:
                    _native.arcee_fusion_merge(views[0], code, views[1], code, shape[-1], out_view, code, threads)

            inputs = MergeInputs("w", xs[:k], [{}] * k, params, base=base, out_dtype=dt)
            for threads in [int(t) for t in args.threads.split(",") if t]:
                torch.set_num_threads(threads or os.cpu_count() or 1)
                t_torch = timeit(lambda: get_method(method).merge(inputs), args.method_repeat, 1)
                t_native = timeit(lambda: run_native(threads), args.repeat, args.warmup)
                run_native(threads)
                row = {
                    "case": case,
                    "shape": list(shape),
                    "dtype": code,
                    "threads": threads,
                    "input_bytes": nbytes,
                    "torch_median_s": statistics.median(t_torch),
                    "native_median_s": statistics.median(t_native),
                    "parity": compare(out, get_method(method).merge(inputs).to(dt)),
                }
                row["torch_gbps"] = nbytes / GB / row["torch_median_s"]
                row["native_gbps"] = nbytes / GB / row["native_median_s"]
                row["speedup"] = row["torch_median_s"] / row["native_median_s"]
                results.append(row)
                p = row["parity"]
                print(
                    f"{'x'.join(map(str, shape)):>11} {code} {case:>12} threads={threads}: "
                    f"torch {row['torch_median_s'] * 1e3:9.1f} ms {row['torch_gbps']:6.2f} GB/s | "
                    f"native {row['native_median_s'] * 1e3:8.1f} ms {row['native_gbps']:6.2f} GB/s | "
                    f"speedup {row['speedup']:6.1f}x | parity: {p['mismatches']} mismatches, max {p['max_ulp']} ulp",
                    flush=True,
                )
        del base, xs, out, views, out_view
    path = write_report(results, args.json, "method-kernels")
    print(f"GB/s = input bytes / median time (threads 0 = all cores). results: {path}")
    return 0


def ab_main(args: argparse.Namespace) -> int:
    import subprocess

    shape = parse_shapes(args.shapes)[0]
    threads = int(args.threads.split(",")[0])
    trees = {"before": str(Path(args.ab).resolve()), "after": str(Path(__file__).resolve().parent.parent / "python")}
    rows: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for which in ("before", "after") if r % 2 == 0 else ("after", "before"):
            cmd = [sys.executable, __file__, "--worker", "--shapes", args.shapes, "--inputs", str(args.inputs)]
            cmd += ["--threads", str(threads), "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
            env = {**os.environ, "PYTHONPATH": trees[which]}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{w} {k} {rows[w][-1][k] * 1e3:.1f} ms" for k in ("weighted_sum", "gta_merge") for w in ("before", "after")
        ), flush=True)  # fmt: skip
    mib = math.prod(shape) * 2 / 2**20
    print(f"{'x'.join(map(str, shape))} BF16 ({mib:.0f} MiB) x {args.inputs} inputs, threads={threads}")
    print(f"before: {rows['before'][0]['native']}\nafter:  {rows['after'][0]['native']}")
    report = {"shape": list(shape), "inputs": args.inputs, "threads": threads, "load_avg": os.getloadavg()}
    for kernel in ("weighted_sum", "gta_merge"):
        ratios = [a[kernel] / b[kernel] for a, b in zip(rows["after"], rows["before"])]
        before = statistics.median(b[kernel] for b in rows["before"])
        after = statistics.median(a[kernel] for a in rows["after"])
        report[kernel] = {"before_s": before, "after_s": after, "ratio": statistics.median(ratios)}
        print(
            f"{kernel:>12}: before {before * 1e3:7.1f} ms, after {after * 1e3:7.1f} ms, "
            f"after/before (median of {len(ratios)} rounds) {statistics.median(ratios):.3f}"
        )
    path = args.json or WORK_DIR / f"kernels-ab-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="32000x2048,5632x2048")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--dtype", default="BF16", choices=sorted(TORCH_DTYPES), help="dtype of the inputs and the output")
    ap.add_argument("--inputs", type=int, default=3, help="number of inputs")
    ap.add_argument("--repeat", type=int, default=9, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--json", type=Path, default=None, help="write results here (default: benches/work/kernels-<timestamp>.json)"
    )
    ap.add_argument(
        "--require-native",
        action="store_true",
        help="exit 1 when the native module is missing instead of running torch only",
    )
    ap.add_argument("--ab", default=None, metavar="BEFORE_PYTHON_DIR", help="time two builds alternately (see above)")
    ap.add_argument("--rounds", type=int, default=5, help="--ab: alternating rounds")
    ap.add_argument(
        "--methods",
        default="",
        help=f"time these merge-method kernels instead: {','.join(METHOD_CASES)} (see above)",
    )
    ap.add_argument("--method-repeat", type=int, default=3, help="--methods: timed runs of each torch reference")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        shape = parse_shapes(args.shapes)[0]
        threads = int(args.threads.split(",")[0])
        print(json.dumps(_worker(shape, args.inputs, threads, args.repeat, args.warmup)))
        return 0
    if args.ab is not None:
        return ab_main(args)
    if args.methods:
        return methods_main(args)

    try:
        try:
            from mergekitty import _native
        except ImportError:
            # Not installed: try the source tree (a .so built in place).
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
            from mergekitty import _native
        print(f"[native] {_native.__file__}")

        weighted_sum = _native.weighted_sum
        native_error = None
    except (ImportError, AttributeError) as e:
        weighted_sum = None
        native_error = f"{type(e).__name__}: {e}"
        print(
            f"[native] mergekitty._native.weighted_sum is not available ({native_error}); "
            "timing the torch reference only"
        )
        if args.require_native:
            return 1

    dt = TORCH_DTYPES[args.dtype]
    weights = [WEIGHTS[i % len(WEIGHTS)] for i in range(args.inputs)]
    threads_list = [int(t) for t in args.threads.split(",") if t]
    results = []
    gen = torch.Generator().manual_seed(0)
    for shape in parse_shapes(args.shapes):
        tensors = [torch.randn(shape, generator=gen).mul_(0.02).to(dt) for _ in weights]
        out = torch.empty(shape, dtype=dt)
        # Flat byte buffers: numpy has no bfloat16, so bytes cross the boundary.
        in_bufs = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors]
        out_buf = out.reshape(-1).view(torch.uint8).numpy()
        nbytes = sum(t.numel() * t.element_size() for t in tensors) + out.numel() * out.element_size()

        def torch_ref() -> torch.Tensor:
            acc = weights[0] * tensors[0].float()
            for w, t in zip(weights[1:], tensors[1:]):
                acc = acc + w * t.float()
            return acc.to(dt)

        acc = torch.empty(shape, dtype=torch.float32)
        tmp = torch.empty(shape, dtype=torch.float32)
        ref_out = torch.empty(shape, dtype=dt)

        def torch_prealloc() -> torch.Tensor:
            # Same arithmetic, no allocation: float32 scratch reused across calls. Separates the
            # cost of fusion from the cost of torch allocating (and page-faulting) temporaries.
            acc.copy_(tensors[0]).mul_(weights[0])
            for w, t in zip(weights[1:], tensors[1:]):
                tmp.copy_(t)
                acc.add_(tmp.mul_(w))
            return ref_out.copy_(acc)

        def native() -> None:
            weighted_sum(in_bufs, [args.dtype] * len(in_bufs), weights, out_buf, args.dtype, threads)

        for threads in threads_list:
            torch.set_num_threads(threads)
            t_torch = timeit(torch_ref, args.repeat, args.warmup)
            row = {
                "shape": list(shape),
                "dtype": args.dtype,
                "inputs": len(weights),
                "threads": threads,
                "bytes": nbytes,
                "torch_median_s": statistics.median(t_torch),
                "torch_times_s": t_torch,
            }
            row["torch_gbps"] = nbytes / GB / row["torch_median_s"]
            t_pre = timeit(torch_prealloc, args.repeat, args.warmup)
            row["torch_prealloc_median_s"] = statistics.median(t_pre)
            row["torch_prealloc_gbps"] = nbytes / GB / row["torch_prealloc_median_s"]
            if weighted_sum is not None:
                t_native = timeit(native, args.repeat, args.warmup)
                row["native_median_s"] = statistics.median(t_native)
                row["native_times_s"] = t_native
                row["native_gbps"] = nbytes / GB / row["native_median_s"]
                row["speedup"] = row["torch_median_s"] / row["native_median_s"]
                row["speedup_vs_prealloc"] = row["torch_prealloc_median_s"] / row["native_median_s"]
                out.zero_()
                native()
                row["parity"] = compare(out, torch_ref())
            results.append(row)
            line = (
                f"{'x'.join(map(str, shape)):>11} {args.dtype} x{len(weights)} threads={threads}: "
                f"torch {row['torch_median_s'] * 1e3:8.2f} ms {row['torch_gbps']:6.2f} GB/s"
                f" | torch prealloc {row['torch_prealloc_median_s'] * 1e3:8.2f} ms "
                f"{row['torch_prealloc_gbps']:6.2f} GB/s"
            )
            if "native_median_s" in row:
                p = row["parity"]
                line += (
                    f" | native {row['native_median_s'] * 1e3:8.2f} ms "
                    f"{row['native_gbps']:6.2f} GB/s | speedup {row['speedup']:5.2f}x "
                    f"({row['speedup_vs_prealloc']:4.2f}x vs prealloc)"
                    f" | parity: {p['mismatches']} mismatches, max {p['max_ulp']} ulp"
                )
            print(line, flush=True)
        del tensors, out, in_bufs, out_buf, acc, tmp, ref_out

    path = write_report(results, args.json, "kernels", native_error=native_error)
    print(
        f"GB/s = (input bytes + output bytes) / median time; speedup = torch / native "
        f"(the reference expression; 'prealloc' = same math into reused float32 scratch). "
        f"load avg {os.getloadavg()[0]:.1f}. results: {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
