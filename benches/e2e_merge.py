#!/usr/bin/env python3
"""End-to-end merge benchmark: mergekitty vs. mergekit, against a measured IO floor.

What it does (see benches/README.md for how to read the output):

1. Generates (once, cached under the work dir) a synthetic Llama-shaped bf16 model set: a base
   and three fine-tunes (base + small random deltas), written as real sharded HF checkpoints.
   ``--scale full`` is TinyLlama-shaped (~1.1B parameters, ~2.2 GB per model); ``--scale tiny``
   is a few MB for quick checks.
2. Measures the IO floor in the same run: reading every input byte the merge needs once from the
   page cache, plus writing the output's number of bytes once and fsyncing it.
3. Runs every merge command as a subprocess and records wall time, the time to make its output
   durable (fsync of the output files after exit; ~0 for a tool that already fsyncs), CPU time,
   peak RSS (``wait4`` ``ru_maxrss``; includes file pages the process mapped) and peak anonymous
   memory (``RssAnon`` summed over the process tree, polled from /proc).
4. Checks every output (tensor names, dtypes, sizes, and a few tensors against a float32 torch
   reference) and prints a table of ratios; writes the results as JSON.

The headline numbers are ratios (time / floor, ours / mergekit): the absolute figures depend on a
shared, noisy machine.

Usage:
    python benches/e2e_merge.py --scale tiny
    python benches/e2e_merge.py --scale full --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_WORK_DIR = BENCH_DIR / "work"

MERGEKIT_SPEC = "mergekit==0.1.5"
MERGE_WEIGHTS = (0.5, 0.3, 0.2)
FINETUNES = ("ft1", "ft2", "ft3")
READ_CHUNK_BYTES = 64 << 20
WRITE_CHUNK_BYTES = 64 << 20
GB = 1e9

# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------

SCALES = {
    # TinyLlama-1.1B shape.
    "full": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        shard_size_bytes=1_000_000_000,
    ),
    # Small enough to generate and merge in seconds, still sharded.
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
        shard_size_bytes=4_000_000,
    ),
}

BASE_STD = 0.02  # weights ~ N(0, 0.02), like the usual init
DELTA_STD = 0.002  # fine-tune delta ~ N(0, 0.002): about 10% of the weight scale


def tensor_specs(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) for every tensor of a LlamaForCausalLM with an untied lm_head, in HF order."""
    h = shape["hidden_size"]
    i = shape["intermediate_size"]
    heads = shape["num_attention_heads"]
    kv = shape["num_key_value_heads"]
    head_dim = h // heads
    v = shape["vocab_size"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, h)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def hf_config(shape: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }


# --------------------------------------------------------------------------------------------
# Model generation
# --------------------------------------------------------------------------------------------


def shard_plan(specs, shard_size_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy assignment of tensors (in order) to shards of at most shard_size_bytes (bf16)."""
    shards: list[list] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = numel(shp) * 2
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    return shards


def model_set_marker(models_dir: Path) -> Path:
    return models_dir / "COMPLETE.json"


def generate_models(models_dir: Path, scale: str, seed: int = 1234) -> dict[str, Path]:
    """Write base + 3 fine-tunes under models_dir unless a matching complete set is there."""
    shape = SCALES[scale]
    names = ("base",) + FINETUNES
    paths = {n: models_dir / n for n in names}
    spec_record = {
        "scale": scale,
        "shape": shape,
        "seed": seed,
        "base_std": BASE_STD,
        "delta_std": DELTA_STD,
        "version": 1,
    }
    marker = model_set_marker(models_dir)
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == spec_record:
                print(f"[models] reusing {models_dir}")
                return paths
        except (OSError, json.JSONDecodeError):
            pass
        print(f"[models] {models_dir} does not match the requested set; regenerating")
    if models_dir.exists():
        shutil.rmtree(models_dir)

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    specs = tensor_specs(shape)
    shards = shard_plan(specs, shape["shard_size_bytes"])
    n_shards = len(shards)
    total_params = sum(numel(s) for _, s in specs)
    total_size = total_params * 2
    print(
        f"[models] generating {len(names)} models of {total_params / 1e9:.3f}B params "
        f"({total_size / GB:.2f} GB each, {n_shards} shards) in {models_dir}"
    )
    t0 = time.perf_counter()
    for p in paths.values():
        p.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    gen = torch.Generator().manual_seed(seed)
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{n_shards:05d}.safetensors"
        # Base shard (~shard_size_bytes), then each fine-tune shard from it; at most two shards
        # plus one temporary are alive at a time.
        base: dict[str, torch.Tensor] = {}
        for name, shp in shard:
            weight_map[name] = fname
            if len(shp) == 1:  # norm weights: around 1
                t = torch.ones(shp, dtype=torch.bfloat16)
                t.add_(torch.randn(shp, dtype=torch.bfloat16, generator=gen).mul_(BASE_STD))
            else:
                t = torch.randn(shp, dtype=torch.bfloat16, generator=gen).mul_(BASE_STD)
            base[name] = t
        save_file(base, str(paths["base"] / fname), metadata={"format": "pt"})
        for ft in FINETUNES:
            tensors = {}
            for name, t in base.items():
                d = torch.randn(t.shape, dtype=torch.bfloat16, generator=gen).mul_(DELTA_STD)
                tensors[name] = d.add_(t)
            save_file(tensors, str(paths[ft] / fname), metadata={"format": "pt"})
            del tensors
        del base
        print(f"[models]   shard {si + 1}/{n_shards} done ({time.perf_counter() - t0:.1f}s)")
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    cfg = hf_config(shape)
    gen_cfg = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "max_length": 2048}
    for p in paths.values():
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (p / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (p / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    marker.write_text(json.dumps(spec_record, indent=2) + "\n")
    print(f"[models] generated in {time.perf_counter() - t0:.1f}s")
    return paths


def ensure_tokenizer(model_dirs, vocab_size: int) -> None:
    """Write a minimal fast tokenizer (WordLevel, vocab_size tokens) into each model dir.

    Real checkpoints ship one and both tools copy it to the output; without it mergekit falls
    back to instantiating a tokenizer, fails and logs a traceback.
    """
    for d in model_dirs:
        if (d / "tokenizer.json").exists() and (d / "tokenizer_config.json").exists():
            continue
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        vocab.update({f"t{i}": i for i in range(3, vocab_size)})
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(d / "tokenizer.json"))
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (d / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, **special}, indent=2)
            + "\n"
        )
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# IO floor
# --------------------------------------------------------------------------------------------


def read_files(files: list[Path], buf: bytearray) -> int:
    """Read every byte of files with large buffered reads into buf; return the byte count."""
    mv = memoryview(buf)
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [mv])
                if n <= 0:
                    break
                total += n
        finally:
            os.close(fd)
    return total


def write_bytes_fsync(path: Path, nbytes: int, buf: bytearray) -> None:
    """Write nbytes to path from a reused buffer, fsync, close."""
    mv = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            n = os.write(fd, mv[: min(left, len(mv))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def page_cache_residency(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (util-linux fincore), or None."""
    if not shutil.which("fincore") or not files:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.stdout.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return res / size if size else None


@dataclass
class Floor:
    read_bytes: int
    write_bytes: int
    read_s: list[float]
    write_s: list[float]
    residency_before: float | None

    @property
    def read_med(self) -> float:
        return statistics.median(self.read_s)

    @property
    def write_med(self) -> float:
        return statistics.median(self.write_s)

    @property
    def total(self) -> float:
        """Serial floor: read everything, then write everything."""
        return self.read_med + self.write_med

    @property
    def overlapped(self) -> float:
        """Floor under perfect overlap of reading and writing (a tool that streams can beat the
        serial floor, never this one)."""
        return max(self.read_med, self.write_med)


def measure_floor(inputs: list[Path], out_bytes: int, out_dir: Path, repeats: int) -> Floor:
    read_buf = bytearray(READ_CHUNK_BYTES)
    write_buf = bytearray(os.urandom(1 << 20) * (WRITE_CHUNK_BYTES >> 20))
    residency = page_cache_residency(inputs)
    read_s, write_s = [], []
    nread = 0
    for _ in range(repeats):
        t = time.perf_counter()
        nread = read_files(inputs, read_buf)
        read_s.append(time.perf_counter() - t)
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / "io-floor-probe.bin"
    for _ in range(repeats):
        t = time.perf_counter()
        write_bytes_fsync(probe, out_bytes, write_buf)
        write_s.append(time.perf_counter() - t)
        probe.unlink()
    return Floor(nread, out_bytes, read_s, write_s, residency)


# --------------------------------------------------------------------------------------------
# Running a command and watching its memory
# --------------------------------------------------------------------------------------------


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssFile:", b"RssShmem:", b"VmRSS:")):
                    k, v = line.split(b":", 1)
                    out[k.decode()] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _descendants(root: int) -> list[int]:
    """root and all its live descendants (scan of /proc/*/stat for parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) < 2:
            continue
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


@dataclass
class RunResult:
    tool: str
    merge: str
    cmd: list[str]
    returncode: int
    wall_s: float
    fsync_after_s: float
    durable_s: float
    user_s: float
    sys_s: float
    maxrss_gb: float  # ru_maxrss of the process (max over it and waited-for descendants)
    peak_anon_gb: float  # max over samples of the sum of RssAnon over the process tree
    peak_file_gb: float  # max over samples of the sum of RssFile over the process tree
    peak_rss_sampled_gb: float  # max over samples of the sum of VmRSS over the process tree
    samples: int
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    out_bytes: int = 0
    check: str = ""
    log: str = ""


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_measured(
    tool: str, merge: str, cmd: list[str], out_dir: Path, log_path: Path, env: dict[str, str], poll_s: float
) -> RunResult:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    peak_anon = peak_file = peak_rss = 0
    samples = 0
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        pids = [proc.pid]
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                wall = time.perf_counter() - t0
                break
            if samples % 10 == 0:  # the /proc scan costs ~1 ms; children are rare and long-lived
                pids = _descendants(proc.pid)
            anon = file_ = rss = 0
            for p in pids:
                st = _status_kb(p)
                anon += st.get("RssAnon", 0)
                file_ += st.get("RssFile", 0) + st.get("RssShmem", 0)
                rss += st.get("VmRSS", 0)
            peak_anon = max(peak_anon, anon)
            peak_file = max(peak_file, file_)
            peak_rss = max(peak_rss, rss)
            samples += 1
            time.sleep(poll_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    t = time.perf_counter()
    if proc.returncode == 0 and out_dir.exists():
        fsync_tree(out_dir)
    fsync_after = time.perf_counter() - t
    kb = 1024 / GB
    return RunResult(
        tool=tool,
        merge=merge,
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        fsync_after_s=fsync_after,
        durable_s=wall + fsync_after,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        maxrss_gb=ru.ru_maxrss * kb,
        peak_anon_gb=peak_anon * kb,
        peak_file_gb=peak_file * kb,
        peak_rss_sampled_gb=peak_rss * kb,
        samples=samples,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        log=str(log_path),
    )


# --------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def output_tensors(out_dir: Path) -> dict[str, tuple[Path, dict]]:
    found = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        for name, info in read_header(f).items():
            found[name] = (f, info)
    return found


def ties_reference(base, fts, weights, density: float):
    """TIES (arXiv:2306.01708) written out plainly: keep the top ``density`` of each task vector by
    magnitude (ties at the threshold kept), elect the sign of the weighted sum, average the agreeing
    entries by their weights."""
    import torch

    kept = []
    for t in fts:
        d = t - base
        k = max(1, int(density * d.numel()))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        kept.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    weighted = [w * d for w, d in zip(weights, kept)]
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)  # an exact-zero sum elects +, as in both tools
    agree = [(torch.sign(d) == sign) & (d != 0) for d in kept]
    total = sum(w * a.float() for w, a in zip(weights, agree))
    merged = sum(wd * a.float() for wd, a in zip(weighted, agree)) / torch.where(
        total == 0, torch.ones_like(total), total
    )
    return base + merged


def check_output(out_dir: Path, merge: str, models: dict[str, Path], shape: dict) -> tuple[str, int]:
    """Validate names/dtypes/shapes and compare a few tensors with a float32 reference."""
    import torch
    from safetensors import safe_open

    expected = dict(tensor_specs(shape))
    got = output_tensors(out_dir)
    out_bytes = sum(i["data_offsets"][1] - i["data_offsets"][0] for _, i in got.values())
    problems = []
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        problems.append(f"names differ (missing {missing}, extra {extra})")
    for name, (_, info) in got.items():
        if info["dtype"] != "BF16":
            problems.append(f"{name} is {info['dtype']}")
            break
        if name in expected and tuple(info["shape"]) != expected[name]:
            problems.append(f"{name} has shape {info['shape']}")
            break
    if not (out_dir / "config.json").exists():
        problems.append("no config.json")
    last = shape["num_hidden_layers"] - 1
    probe = [
        "model.norm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        f"model.layers.{last}.self_attn.v_proj.weight",
    ]
    max_rel = 0.0

    def load(model_dir: Path, name: str) -> torch.Tensor:
        idx = json.loads((model_dir / "model.safetensors.index.json").read_text())
        with safe_open(str(model_dir / idx["weight_map"][name]), "pt") as f:
            return f.get_tensor(name).float()

    if merge not in ("linear", "task_arithmetic", "ties"):
        probe = []  # random methods: names, shapes and dtypes are checked, values are not
    for name in probe:
        if name not in got:
            continue
        fts = [load(models[m], name) for m in FINETUNES]
        if merge == "linear":
            ref = sum(w * t for w, t in zip(MERGE_WEIGHTS, fts))
        elif merge == "ties":
            ref = ties_reference(load(models["base"], name), fts, MERGE_WEIGHTS, 0.5)
        else:
            base = load(models["base"], name)
            ref = base + sum(w * (t - base) for w, t in zip(MERGE_WEIGHTS, fts))
        ref = ref.to(torch.bfloat16).float()
        with safe_open(str(got[name][0]), "pt") as f:
            out = f.get_tensor(name).float()
        rel = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        max_rel = max(max_rel, rel)
    # bf16 has 8 significant bits: a few ulps of difference is rounding order, more is a bug.
    if max_rel > 2**-5:
        why = (
            "; the reference keeps every tie at the magnitude threshold, mergekit 0.1.5 exactly k"
            if merge == "ties"
            else ""
        )
        problems.append(f"values differ from reference (max rel err {max_rel:.2e}{why})")
    status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    return f"{status} (max rel err {max_rel:.1e})" if not problems else status, out_bytes


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def ensure_mergekit_venv(venv: Path) -> Path:
    """Create venv (--system-site-packages, reusing the global torch) and install mergekit."""
    exe = venv / "bin" / "mergekit-yaml"
    py = venv / "bin" / "python"
    if exe.exists():
        ok = subprocess.run([str(py), "-c", "import mergekit"], capture_output=True).returncode == 0
        if ok:
            return exe
    print(
        f"[incumbent] creating {venv} and installing {MERGEKIT_SPEC} (system site packages "
        "visible, so the global torch is reused; the global environment is not modified)"
    )
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", MERGEKIT_SPEC], check=True)
    return exe


def tool_version(python: str, dist: str) -> str | None:
    r = subprocess.run(
        [python, "-c", f"from importlib.metadata import version; print(version('{dist}'))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def write_configs(cfg_dir: Path, models: dict[str, Path]) -> dict[str, Path]:
    cfg_dir.mkdir(parents=True, exist_ok=True)
    model_lines = "".join(
        f"  - model: {models[ft]}\n    parameters:\n      weight: {w}\n" for ft, w in zip(FINETUNES, MERGE_WEIGHTS)
    )
    configs = {
        "linear": "merge_method: linear\nmodels:\n" + model_lines,
        "task_arithmetic": (f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n" + model_lines),
    }
    sparse_lines = "".join(
        f"  - model: {models[ft]}\n    parameters:\n      weight: {w}\n      density: 0.5\n"
        for ft, w in zip(FINETUNES, MERGE_WEIGHTS)
    )
    for method, extra in (("ties", ""), ("dare_ties", ""), ("della", "parameters:\n  epsilon: 0.1\n")):
        configs[method] = (
            f"merge_method: {method}\nbase_model: {models['base']}\nrandom_seed: 7\n"
            + extra
            + "models:\n"
            + sparse_lines
        )
    base, ft1, ft2 = models["base"], models[FINETUNES[0]], models[FINETUNES[1]]
    # the geometric and elementwise methods, on the inputs they take (MERGE_INPUTS)
    configs["slerp"] = f"merge_method: slerp\nbase_model: {base}\nparameters:\n  t: 0.3\nmodels:\n  - model: {ft1}\n"
    configs["nuslerp"] = (
        f"merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
        f"  - model: {ft1}\n    parameters:\n      weight: 0.6\n  - model: {ft2}\n    parameters:\n      weight: 0.4\n"
    )
    configs["multislerp"] = f"merge_method: multislerp\nbase_model: {base}\nmodels:\n" + model_lines
    configs["karcher"] = "merge_method: karcher\nmodels:\n" + "".join(f"  - model: {models[ft]}\n" for ft in FINETUNES)
    configs["model_stock"] = f"merge_method: model_stock\nbase_model: {base}\nmodels:\n" + model_lines
    configs["sce"] = f"merge_method: sce\nbase_model: {base}\nparameters:\n  select_topk: 0.5\nmodels:\n" + model_lines
    for method, extra in (("nearswap", "parameters:\n  t: 0.001\n"), ("arcee_fusion", "")):
        configs[method] = f"merge_method: {method}\nbase_model: {base}\n{extra}models:\n  - model: {ft1}\n"
    paths = {}
    for name, text in configs.items():
        p = cfg_dir / f"{name}.yml"
        p.write_text(text)
        paths[name] = p
    return paths


def results_commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip()


MERGE_INPUTS = {
    "linear": list(FINETUNES),
    "task_arithmetic": ["base", *FINETUNES],
    "ties": ["base", *FINETUNES],
    "dare_ties": ["base", *FINETUNES],
    "della": ["base", *FINETUNES],
    "slerp": ["base", FINETUNES[0]],
    "nuslerp": ["base", *FINETUNES[:2]],
    "multislerp": ["base", *FINETUNES],
    "karcher": list(FINETUNES),
    "model_stock": ["base", *FINETUNES],
    "sce": ["base", *FINETUNES],
    "nearswap": ["base", FINETUNES[0]],
    "arcee_fusion": ["base", FINETUNES[0]],
}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def median_of(runs: list[RunResult], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


@contextlib.contextmanager
def work_lock(path: Path):
    """Exclusive flock, so that concurrent runs do not generate models or venvs on top of each
    other."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def other_benchmarks() -> list[str]:
    """Command lines of other running instances of this script (they skew each other's times)."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in (me, os.getppid()):
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"e2e_merge.py") for a in argv) and b"timeout" not in argv[0]:
            found.append(f"pid {entry.name}: " + " ".join(a.decode(errors="replace") for a in argv))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="scratch dir for models, configs, outputs, logs, results (default: benches/work)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per (merge, tool); medians reported")
    ap.add_argument(
        "--floor-repeat", type=int, default=3, help="repetitions of the read and write floor measurement (median used)"
    )
    ap.add_argument(
        "--merges",
        default="linear,task_arithmetic",
        help="comma-separated subset of: " + ", ".join(MERGE_INPUTS),
    )
    ap.add_argument("--skip-incumbent", action="store_true", help="do not run mergekit")
    ap.add_argument("--skip-ours", action="store_true", help="do not run mergekitty")
    ap.add_argument(
        "--ours-cmd",
        default="mergekitty-yaml",
        help="our command (looked up on PATH); extra args may follow, space-separated",
    )
    ap.add_argument(
        "--mergekit-venv", type=Path, default=None, help="venv for mergekit (default: WORK_DIR/mergekit-venv)"
    )
    ap.add_argument("--poll-ms", type=float, default=20.0, help="memory polling period")
    ap.add_argument("--keep-output", action="store_true", help="keep merged outputs")
    ap.add_argument("--no-check", action="store_true", help="skip output validation")
    args = ap.parse_args(argv)

    work: Path = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    merges = [m.strip() for m in args.merges.split(",") if m.strip()]
    for m in merges:
        if m not in MERGE_INPUTS:
            ap.error(f"unknown merge {m!r}")
    shape = SCALES[args.scale]

    # ---- models and configs
    others = other_benchmarks()
    if others:
        print("[bench] WARNING: other benchmark runs are active; timings will interfere:\n  " + "\n  ".join(others))
    with work_lock(work / ".lock"):
        models = generate_models(work / f"models-{args.scale}", args.scale)
        ensure_tokenizer(models.values(), shape["vocab_size"])
    configs = write_configs(work / f"configs-{args.scale}", models)
    # Per-process output and log names: concurrent runs must not delete each other's outputs.
    out_root = work / f"out-{args.scale}" / f"pid{os.getpid()}"
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    log_stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    model_bytes = {n: sum(f.stat().st_size for f in weight_files(p)) for n, p in models.items()}
    tensor_bytes = sum(numel(s) for _, s in tensor_specs(shape)) * 2

    # ---- candidates
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    candidates: dict[str, list[str]] = {}
    versions: dict[str, str | None] = {}
    if not args.skip_ours:
        ours = args.ours_cmd.split()
        exe = shutil.which(ours[0])
        src = REPO_ROOT / "python"
        in_tree = sorted((src / "mergekitty").glob("_native*.so"))
        if exe is not None:
            candidates["mergekitty"] = [exe, *ours[1:]]
            versions["mergekitty"] = tool_version(sys.executable, "mergekitty")
        elif ours[0] == "mergekitty-yaml" and in_tree:
            # Built in place (e.g. `maturin develop` into another env, or a copied .so): run the
            # CLI module from the source tree.
            print(f"[ours] mergekitty-yaml is not on PATH; running the source tree ({in_tree[0]})")
            candidates["mergekitty"] = [sys.executable, "-m", "mergekitty.cli.yaml_cmd", *ours[1:]]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
            versions["mergekitty"] = "source tree " + results_commit()
        else:
            print(
                f"[ours] {ours[0]!r} is not on PATH; skipping mergekitty (build and install the "
                "package, e.g. `maturin develop --release` or `pip install .`)"
            )
    if not args.skip_incumbent:
        venv = (args.mergekit_venv or work / "mergekit-venv").resolve()
        with work_lock(work / ".lock"):
            exe = ensure_mergekit_venv(venv)
        candidates["mergekit"] = [str(exe)]
        versions["mergekit"] = tool_version(str(venv / "bin" / "python"), "mergekit")
    if not candidates:
        print("[bench] no candidate to run; measuring the IO floor only")

    # ---- warm the page cache: read every input byte once, untimed
    all_inputs = [f for n in models for f in weight_files(models[n])]
    print(f"[floor] warming the page cache ({sum(model_bytes.values()) / GB:.2f} GB)")
    read_files(all_inputs, bytearray(READ_CHUNK_BYTES))

    results: dict = {
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "scale": args.scale,
        "shape": shape,
        "repeat": args.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB,
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "git_commit": results_commit(),
        "versions": versions,
        "concurrent_benchmarks": others,
        "model_bytes": model_bytes,
        "merges": {},
    }

    for merge in merges:
        inputs = [f for n in MERGE_INPUTS[merge] for f in weight_files(models[n])]
        floor = measure_floor(inputs, tensor_bytes, out_root, args.floor_repeat)
        print(
            f"[floor] {merge}: read {floor.read_bytes / GB:.2f} GB in {floor.read_med:.2f}s "
            f"({floor.read_bytes / GB / floor.read_med:.1f} GB/s), write+fsync "
            f"{floor.write_bytes / GB:.2f} GB in {floor.write_med:.2f}s "
            f"({floor.write_bytes / GB / floor.write_med:.2f} GB/s); floor {floor.total:.2f}s"
            + (
                f"; inputs {100 * floor.residency_before:.0f}% in page cache"
                if floor.residency_before is not None
                else ""
            )
        )
        entry = {
            "floor": {
                **asdict(floor),
                "read_median_s": floor.read_med,
                "write_median_s": floor.write_med,
                "floor_s": floor.total,
                "overlapped_floor_s": floor.overlapped,
            },
            "runs": {},
        }
        results["merges"][merge] = entry
        for tool, cmd in candidates.items():
            runs = []
            for rep in range(args.repeat):
                out_dir = out_root / f"{merge}-{tool}"
                log = log_dir / f"{log_stamp}-{args.scale}-{merge}-{tool}-{rep}.log"
                full_cmd = [*cmd, str(configs[merge]), str(out_dir)]
                # Re-read the inputs untimed so eviction by the previous run does not count.
                read_files(inputs, bytearray(READ_CHUNK_BYTES))
                r = run_measured(tool, merge, full_cmd, out_dir, log, env, args.poll_ms / 1000)
                if r.returncode != 0:
                    tail = Path(log).read_text(errors="replace")[-3000:]
                    r.check = f"FAIL: exit code {r.returncode}"
                    print(f"[{tool}] {merge} failed (exit {r.returncode}); log {log}:\n{tail}")
                elif not args.no_check:
                    r.check, r.out_bytes = check_output(out_dir, merge, models, shape)
                else:
                    r.check = "unchecked"
                print(
                    f"[{tool}] {merge} run {rep + 1}/{args.repeat}: wall {r.wall_s:.2f}s "
                    f"(+{r.fsync_after_s:.2f}s fsync after exit), cpu {r.user_s + r.sys_s:.1f}s, "
                    f"maxrss {r.maxrss_gb:.2f} GB, peak anon {r.peak_anon_gb:.2f} GB, "
                    f"load {r.loadavg_before[0]:.1f}->{r.loadavg_after[0]:.1f}; {r.check}"
                )
                if not args.keep_output and out_dir.exists():
                    shutil.rmtree(out_dir)
                runs.append(r)
            entry["runs"][tool] = [asdict(r) for r in runs]
            entry.setdefault("_objs", {})[tool] = runs

    # ---- table
    header = [
        "merge",
        "tool",
        "wall s",
        "durable s",
        "durable/floor",
        "/overlap floor",
        "cpu s",
        "maxRSS GB",
        "peak anon GB",
        "peak file GB",
        "check",
    ]
    rows = []
    for merge, entry in results["merges"].items():
        fl = entry["floor"]["floor_s"]
        fo = entry["floor"]["overlapped_floor_s"]
        rows.append(
            [
                merge,
                "IO floor",
                "",
                f"{fl:.2f}",
                "1.00",
                f"{fl / fo:.2f}",
                "",
                "",
                "",
                "",
                f"read {entry['floor']['read_median_s']:.2f}s + write {entry['floor']['write_median_s']:.2f}s",
            ]
        )
        summary = {}
        for tool, runs in entry.pop("_objs", {}).items():
            ok = all(r.returncode == 0 for r in runs)
            wall = median_of(runs, "wall_s")
            durable = median_of(runs, "durable_s")
            s = {
                "ok": ok,
                "wall_s": wall,
                "durable_s": durable,
                "durable_over_floor": durable / fl,
                "wall_over_floor": wall / fl,
                "durable_over_overlapped_floor": durable / fo,
                "cpu_s": statistics.median(r.user_s + r.sys_s for r in runs),
                "maxrss_gb": max(r.maxrss_gb for r in runs),
                "peak_anon_gb": max(r.peak_anon_gb for r in runs),
                "peak_file_gb": max(r.peak_file_gb for r in runs),
            }
            summary[tool] = s
            checks = sorted({r.check for r in runs})
            rows.append(
                [
                    merge,
                    tool,
                    f"{wall:.2f}",
                    f"{durable:.2f}",
                    f"{s['durable_over_floor']:.2f}",
                    f"{s['durable_over_overlapped_floor']:.2f}",
                    f"{s['cpu_s']:.1f}",
                    f"{s['maxrss_gb']:.2f}",
                    f"{s['peak_anon_gb']:.2f}",
                    f"{s['peak_file_gb']:.2f}",
                    " / ".join(checks),
                ]
            )
        both = [summary.get(t) for t in ("mergekitty", "mergekit")]
        if all(both) and not all(s["ok"] for s in both):
            rows.append([merge, "ours/mergekit", "n/a", "n/a", "", "", "", "", "", "", "a run failed"])
        elif all(both):
            a, b = summary["mergekitty"], summary["mergekit"]
            ratio = {
                "durable": a["durable_s"] / b["durable_s"],
                "wall": a["wall_s"] / b["wall_s"],
                "maxrss": a["maxrss_gb"] / b["maxrss_gb"] if b["maxrss_gb"] else None,
                "peak_anon": a["peak_anon_gb"] / b["peak_anon_gb"] if b["peak_anon_gb"] else None,
            }
            summary["ours_over_mergekit"] = ratio

            def f2(v):
                return f"{v:.2f}" if v is not None else "-"

            rows.append(
                [
                    merge,
                    "ours/mergekit",
                    f2(ratio["wall"]),
                    f2(ratio["durable"]),
                    "",
                    "",
                    "",
                    f2(ratio["maxrss"]),
                    f2(ratio["peak_anon"]),
                    "",
                    "",
                ]
            )
        entry["summary"] = summary

    print()
    print(
        f"scale={args.scale}  repeat={args.repeat}  cpus={os.cpu_count()}  "
        f"model={tensor_bytes / GB:.2f} GB  load avg now {os.getloadavg()[0]:.1f}"
    )
    print(fmt_table(rows, header))
    if not args.keep_output and out_root.exists():
        shutil.rmtree(out_root)
    print(
        "durable = wall + fsync of the output files after exit (the floor includes an fsync; "
        "mergekit does not fsync, mergekitty does).\nfloor = read + write (serial); overlap "
        "floor = max(read, write), reachable only by fully overlapping reads and writes.\n"
        "Ratios are the headline; absolute times are noisy on a shared machine."
    )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = work / f"results-{args.scale}-{stamp}.json"
    out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {out_json}")
    failed = any(
        not s.get("ok", True)
        for e in results["merges"].values()
        for k, s in e["summary"].items()
        if k != "ours_over_mergekit"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
