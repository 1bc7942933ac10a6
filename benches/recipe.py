#!/usr/bin/env python3
"""A two-stage recipe, fused against staged, on the e2e model set (benches/e2e_merge.py).

The recipe: ``avg`` = linear of ft1 and ft2 (0.5/0.5); the result = ties of base, avg and ft3
(weights 0.5/0.3, density 0.5). Three runs, interleaved ``--repeat`` times:

- **fused**: ``mergekitty-yaml recipe.yml OUT``: one plan, ``avg`` computed in memory as ties reads it;
- **staged**: what the other tools pay: ``avg`` merged and written (fsynced), then the ties merge
  reading it back (two ``mergekitty-yaml`` runs; the time is their sum, each made durable);
- **one merge**: the ties merge alone on written models (ft1 standing in for avg), for scale.

Against the IO floor measured in the same run: every input of the recipe read once (base, ft1,
ft2, ft3) plus the output written once and fsynced. Reported as ratios: fused / staged,
fused / floor, and peak anonymous memory fused / staged.

Usage: python benches/recipe.py [--scale full|tiny] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import e2e_merge as e2e  # noqa: E402

DOCS = """\
name: avg
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
---
merge_method: ties
base_model: {base}
models:
  - model: {avg}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.5}}
random_seed: 7
"""


def split(text: str) -> tuple[str, str]:
    first, second = text.split("---\n")
    return first, second


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="full", choices=sorted(e2e.SCALES))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=e2e.DEFAULT_WORK_DIR)
    ap.add_argument("--ours-cmd", default=None, help="default: mergekitty-yaml on PATH, else the source tree")
    ap.add_argument("--poll-ms", type=float, default=20)
    ap.add_argument(
        "--mergekit-venv",
        type=Path,
        default=None,
        help="a venv with mergekit 0.1.5: also run the recipe with its mergekit-multi (intermediates written)",
    )
    args = ap.parse_args(argv)

    work = args.work_dir
    models = e2e.generate_models(work / f"models-{args.scale}", args.scale)
    cmd = args.ours_cmd.split() if args.ours_cmd else _ours()
    runs_dir = work / "recipe"
    runs_dir.mkdir(parents=True, exist_ok=True)
    recipe = runs_dir / "recipe.yml"
    paths = {k: str(v) for k, v in models.items()}
    recipe.write_text(DOCS.format(**paths, avg="avg"))
    first, second = split(DOCS.format(**paths, avg=str(runs_dir / "staged-avg")))
    (runs_dir / "stage1.yml").write_text(first)
    (runs_dir / "stage2.yml").write_text(second)
    (runs_dir / "one.yml").write_text(split(DOCS.format(**paths, avg=paths["ft1"]))[1])
    env = {**os.environ, "MERGEKITTY_CACHE": str(runs_dir / "cache")}

    inputs = [f for m in ("base", "ft1", "ft2", "ft3") for f in e2e.weight_files(models[m])]
    out_bytes = sum(f.stat().st_size for f in e2e.weight_files(models["base"]))
    e2e.read_files(inputs, bytearray(e2e.READ_CHUNK_BYTES))  # warm the page cache
    floor = e2e.measure_floor(inputs, out_bytes, runs_dir / "floor", 3)

    results: dict[str, list[e2e.RunResult]] = {"fused": [], "staged-1": [], "staged-2": [], "one": []}
    if args.mergekit_venv is not None:
        results["mergekit-multi"] = []
    poll = args.poll_ms / 1000
    for i in range(args.repeat):
        log = runs_dir / f"log-{i}"
        results["fused"].append(
            e2e.run_measured(
                "ours",
                "fused",
                [*cmd, str(recipe), str(runs_dir / "fused")],
                runs_dir / "fused",
                Path(f"{log}-fused.txt"),
                env,
                poll,
            )
        )
        results["staged-1"].append(
            e2e.run_measured(
                "ours",
                "stage1",
                [*cmd, str(runs_dir / "stage1.yml"), str(runs_dir / "staged-avg")],
                runs_dir / "staged-avg",
                Path(f"{log}-s1.txt"),
                env,
                poll,
            )
        )
        results["staged-2"].append(
            e2e.run_measured(
                "ours",
                "stage2",
                [*cmd, str(runs_dir / "stage2.yml"), str(runs_dir / "staged")],
                runs_dir / "staged",
                Path(f"{log}-s2.txt"),
                env,
                poll,
            )
        )
        results["one"].append(
            e2e.run_measured(
                "ours",
                "one",
                [*cmd, str(runs_dir / "one.yml"), str(runs_dir / "one")],
                runs_dir / "one",
                Path(f"{log}-one.txt"),
                env,
                poll,
            )
        )
        if args.mergekit_venv is not None:
            mk = [str(args.mergekit_venv / "bin" / "mergekit-multi"), str(recipe)]
            mk += ["--out-path", str(runs_dir / "mk"), "-I", str(runs_dir / "mk-inter"), "--no-lazy"]
            shutil.rmtree(runs_dir / "mk-inter", ignore_errors=True)
            results["mergekit-multi"].append(
                e2e.run_measured("mergekit", "multi", mk, runs_dir / "mk", Path(f"{log}-mk.txt"), env, poll)
            )
            e2e.fsync_tree(runs_dir / "mk-inter")  # its intermediate is part of what it wrote
        for name, rs in results.items():
            if rs[-1].returncode != 0:
                print(f"{name} failed; see {rs[-1].log}", file=sys.stderr)
                return 1
    same = _same(runs_dir / "fused", runs_dir / "staged")

    def med(name: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results[name])

    fused = med("fused", "durable_s")
    staged = med("staged-1", "durable_s") + med("staged-2", "durable_s")
    one = med("one", "durable_s")
    anon_fused = med("fused", "peak_anon_gb")
    anon_staged = max(med("staged-1", "peak_anon_gb"), med("staged-2", "peak_anon_gb"))
    rows = [
        ["fused", f"{fused:.2f}", f"{fused / floor.total:.2f}", f"{anon_fused:.2f}"],
        ["staged (both runs)", f"{staged:.2f}", f"{staged / floor.total:.2f}", f"{anon_staged:.2f}"],
        ["one merge (ties alone)", f"{one:.2f}", f"{one / floor.total:.2f}", f"{med('one', 'peak_anon_gb'):.2f}"],
    ]
    print(f"IO floor (read 4 models once, write the output once): {floor.total:.2f} s")
    print(e2e.fmt_table(rows, ["run", "durable s", "/ floor", "anon GB"]))
    print(f"fused / staged time: {fused / staged:.2f}   fused / one merge: {fused / one:.2f}")
    print(f"fused / staged anonymous memory: {anon_fused / anon_staged:.2f}")
    print(f"fused output equals staged output byte for byte: {same}")
    if results.get("mergekit-multi"):
        mk_s, mk_anon = med("mergekit-multi", "durable_s"), med("mergekit-multi", "peak_anon_gb")
        print(f"mergekit-multi: {mk_s:.2f} s ({mk_s / floor.total:.2f}x the floor), {mk_anon:.2f} GB anonymous")
        print(f"fused / mergekit-multi time: {fused / mk_s:.3f} ({mk_s / fused:.1f}x faster)")
        print(f"fused / mergekit-multi anonymous memory: {anon_fused / mk_anon:.2f}")
    (runs_dir / "results.json").write_text(
        json.dumps(
            {
                "floor_s": floor.total,
                "fused_s": fused,
                "staged_s": staged,
                "one_merge_s": one,
                "anon_fused_gb": anon_fused,
                "anon_staged_gb": anon_staged,
                "identical": same,
                "commit": e2e.results_commit(),
            },
            indent=2,
        )
    )
    for d in ("fused", "staged", "staged-avg", "one", "cache", "mk", "mk-inter"):
        shutil.rmtree(runs_dir / d, ignore_errors=True)
    return 0


def _ours() -> list[str]:
    exe = shutil.which("mergekitty-yaml")
    if exe:
        return [exe, "--quiet"]
    return [sys.executable, "-m", "mergekitty.cli.yaml_cmd", "--quiet"]


def _same(a: Path, b: Path) -> bool:
    """Whether the two outputs hold the same tensors, byte for byte (read tensor by tensor)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                out.update(dict.fromkeys(st.keys(), f))
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            return False
        if not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
            return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
