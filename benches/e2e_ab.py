#!/usr/bin/env python3
"""Before/after end-to-end benchmark: two builds of mergekitty-yaml, interleaved run by run.

On a shared 2-core machine the wall time of a merge swings by 2x with other people's load, far
more than most regressions; two separate e2e_merge.py runs minutes apart mostly measure that.
This script runs the two commands alternately on the same e2e_merge.py model set and configs
(pair k runs BEFORE then AFTER for even k, AFTER then BEFORE for odd k, each with warm inputs),
so the two runs of a pair are seconds apart and share the load; the headline is the median over
pairs of after/before wall time. CPU time (user + sys) is reported too: it moves much less with
load than wall time does. With --compare (default on) the outputs of the first pair are compared
tensor by tensor on raw bytes (the configs fix random_seed, so DARE/DELLA must match as well).

Usage (models and configs come from e2e_merge.py, generated on first use):
    python benches/e2e_ab.py --before /venv-old/bin/mergekitty-yaml --after /venv-new/bin/mergekitty-yaml
    python benches/e2e_ab.py --scale full --pairs 6 --merges ties,della --before ... --after ...
Results: WORK_DIR/ab-<scale>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_merge as E  # noqa: E402


def compare_bits(a: Path, b: Path) -> str:
    """'identical (N tensors)' or a description of the first differences."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return f"DIFFERENT: tensor names differ ({len(set(ia) ^ set(ib))} not in both)"
    diffs = []
    for name in sorted(ia):
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            diffs.append(name)
    if diffs:
        return f"DIFFERENT: {len(diffs)} of {len(ia)} tensors differ, e.g. {diffs[:3]}"
    return f"identical ({len(ia)} tensors, raw bytes)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="BEFORE command (path; extra args space-separated)")
    ap.add_argument("--after", required=True, help="AFTER command (path; extra args space-separated)")
    ap.add_argument("--scale", choices=sorted(E.SCALES), default="full")
    ap.add_argument("--work-dir", type=Path, default=E.DEFAULT_WORK_DIR)
    ap.add_argument("--merges", default="linear,ties,dare_ties,della")
    ap.add_argument("--pairs", type=int, default=5, help="before/after pairs per merge")
    ap.add_argument("--poll-ms", type=float, default=20.0)
    ap.add_argument("--no-compare", action="store_true", help="skip the bit-for-bit output comparison")
    args = ap.parse_args(argv)

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    merges = [m.strip() for m in args.merges.split(",") if m.strip()]
    for m in merges:
        if m not in E.MERGE_INPUTS:
            ap.error(f"unknown merge {m!r}")
    cmds = {}
    for ver in ("before", "after"):
        parts = getattr(args, ver).split()
        exe = shutil.which(parts[0])
        if exe is None:
            ap.error(f"--{ver}: {parts[0]!r} not found")
        cmds[ver] = [exe, *parts[1:]]
    with E.work_lock(work / ".lock"):
        models = E.generate_models(work / f"models-{args.scale}", args.scale)
        E.ensure_tokenizer(models.values(), E.SCALES[args.scale]["vocab_size"])
    configs = E.write_configs(work / f"configs-{args.scale}", models)
    out_root = work / f"out-{args.scale}" / f"ab-pid{os.getpid()}"
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    others = E.other_benchmarks()
    if others:
        print("[ab] WARNING: other benchmark runs are active:\n  " + "\n  ".join(others))

    results: dict = {"timestamp": stamp, "scale": args.scale, "cmds": cmds, "pairs": args.pairs, "merges": {}}
    rows = []
    for merge in merges:
        inputs = [f for n in E.MERGE_INPUTS[merge] for f in E.weight_files(models[n])]
        runs: dict[str, list[E.RunResult]] = {"before": [], "after": []}
        compare = None
        for k in range(args.pairs):
            for ver in ("before", "after") if k % 2 == 0 else ("after", "before"):
                out_dir = out_root / f"{merge}-{ver}"
                log = log_dir / f"{stamp}-ab-{args.scale}-{merge}-{ver}-{k}.log"
                E.read_files(inputs, bytearray(E.READ_CHUNK_BYTES))  # warm inputs, untimed
                r = E.run_measured(
                    ver, merge, [*cmds[ver], str(configs[merge]), str(out_dir)], out_dir, log, env, args.poll_ms / 1000
                )
                r.check = "ok" if r.returncode == 0 else f"FAIL: exit code {r.returncode} (log {log})"
                runs[ver].append(r)
                print(
                    f"[{ver:6}] {merge} pair {k + 1}/{args.pairs}: wall {r.wall_s:.2f}s, cpu "
                    f"{r.user_s + r.sys_s:.1f}s, maxrss {r.maxrss_gb:.2f} GB, peak anon {r.peak_anon_gb:.2f} GB, "
                    f"load {r.loadavg_before[0]:.1f}; {r.check}"
                )
            if k == 0 and not args.no_compare and all(runs[v][0].returncode == 0 for v in runs):
                compare = compare_bits(out_root / f"{merge}-before", out_root / f"{merge}-after")
                print(f"[compare] {merge}: {compare}")
            for ver in runs:
                shutil.rmtree(out_root / f"{merge}-{ver}", ignore_errors=True)
        ok = all(r.returncode == 0 for v in runs for r in runs[v])
        med = statistics.median
        pair_ratio = [a.wall_s / b.wall_s for a, b in zip(runs["after"], runs["before"])]
        cpu = {v: med(r.user_s + r.sys_s for r in runs[v]) for v in runs}
        s = {
            "ok": ok,
            "compare": compare,
            "wall_s": {v: med(r.wall_s for r in runs[v]) for v in runs},
            "cpu_s": cpu,
            "maxrss_gb": {v: med(r.maxrss_gb for r in runs[v]) for v in runs},
            "peak_anon_gb": {v: med(r.peak_anon_gb for r in runs[v]) for v in runs},
            "pair_wall_ratios": pair_ratio,
            "wall_ratio_median_of_pairs": med(pair_ratio),
            "cpu_ratio": cpu["after"] / cpu["before"],
        }
        results["merges"][merge] = {"summary": s, "runs": {v: [asdict(r) for r in runs[v]] for v in runs}}
        for v in ("before", "after"):
            rows.append(
                [
                    merge,
                    v,
                    f"{s['wall_s'][v]:.2f}",
                    f"{s['cpu_s'][v]:.1f}",
                    f"{s['maxrss_gb'][v]:.2f}",
                    f"{s['peak_anon_gb'][v]:.2f}",
                    "",
                    "",
                ]
            )
        rows.append(
            [
                merge,
                "after/before",
                f"{s['wall_s']['after'] / s['wall_s']['before']:.2f}",
                f"{s['cpu_ratio']:.2f}",
                "",
                "",
                f"{s['wall_ratio_median_of_pairs']:.2f}",
                "ok" if ok else "a run failed",
            ]
        )
    shutil.rmtree(out_root, ignore_errors=True)
    print(f"\nscale={args.scale}  pairs={args.pairs}  medians; load avg now {os.getloadavg()[0]:.1f}")
    print(E.fmt_table(rows, ["merge", "", "wall s", "cpu s", "maxRSS GB", "peak anon GB", "pair ratio", "runs"]))
    for merge, e in results["merges"].items():
        if e["summary"]["compare"]:
            print(f"outputs {merge}: {e['summary']['compare']}")
    out_json = work / f"ab-{args.scale}-{stamp}.json"
    out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {out_json}")
    return 0 if all(e["summary"]["ok"] for e in results["merges"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
