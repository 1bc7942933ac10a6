"""Resuming: a merge interrupted or killed after some shards were complete reuses them when it is
run again with the same plan and inputs, verified by size and digest; anything else starts over.
The result is always the merge a single uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_state
from mergekitty import run_merge

pytestmark = pytest.mark.faults

SHARD = 120_000  # the tiny llama merge is ~650 kB: several shards


def _config(llama, *names, seed=None):
    models = "".join(f"\n  - model: {llama[n]}\n    parameters: {{weight: 0.5, density: 0.5}}" for n in names)
    extra = f"random_seed: {seed}\n" if seed is not None else ""
    return f"base_model: {llama['base']}\nmodels:{models}\nmerge_method: dare_ties\n{extra}"


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.mergekitty-staging"


def _merge(config, out, stop_after=None):
    """Run the merge; with ``stop_after``, Ctrl-C after that many tensors. Returns the tensors
    this run computed."""
    computed = []

    def progress(job, seconds):
        computed.append(job.out_name)
        if stop_after is not None and len(computed) == stop_after:
            raise KeyboardInterrupt

    run_merge(config, out, progress=progress, out_shard_size=SHARD)
    return computed


@pytest.fixture
def reference(llama, tmp_path):
    config = _config(llama, "ft1", "ft2", seed=7)
    out = tmp_path / "reference"
    everything = _merge(config, out)
    return config, read_state(out), everything


def test_an_interrupted_merge_resumes_from_its_complete_shards(reference, tmp_path, caplog):
    config, expected, everything = reference
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _merge(config, out, stop_after=len(everything) // 2)
    assert not out.exists()
    journal = [json.loads(line) for line in (_staging(out) / ".mergekitty-journal").read_text().splitlines()]
    complete = [e["shard"] for e in journal[1:]]
    assert complete and all((_staging(out) / n).is_file() for n in complete)
    assert not any(n.endswith(".partial") for n in os.listdir(_staging(out)))

    computed = _merge(config, out)
    assert "resuming" in caplog.text
    assert 0 < len(computed) < len(everything)  # only the tensors of the missing shards
    state = read_state(out)
    assert state.keys() == expected.keys() and all(state[k].equal(v) for k, v in expected.items())
    assert not _staging(out).exists()
    assert not any(n.startswith(".") for n in os.listdir(out))


def test_a_killed_merge_resumes(reference, tmp_path):
    config, expected, everything = reference
    out = tmp_path / "out"
    (tmp_path / "c.yml").write_text(config)
    code = (
        "import os, signal\n"
        "from mergekitty import run_merge\n"
        "n = []\n"
        "def progress(job, s):\n"
        "    n.append(job)\n"
        f"    if len(n) == {len(everything) * 2 // 3}: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run_merge(open({str(tmp_path / 'c.yml')!r}).read(), {str(out)!r}, progress=progress, out_shard_size={SHARD})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    computed = _merge(config, out)
    assert 0 < len(computed) < len(everything)
    state = read_state(out)
    assert all(state[k].equal(v) for k, v in expected.items())


def test_a_damaged_staged_shard_is_written_again(reference, tmp_path):
    config, expected, everything = reference
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _merge(config, out, stop_after=len(everything) - 2)
    journal = [json.loads(line) for line in (_staging(out) / ".mergekitty-journal").read_text().splitlines()]
    damaged = _staging(out) / journal[1]["shard"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    computed = _merge(config, out)
    state = read_state(out)
    assert all(state[k].equal(v) for k, v in expected.items())
    reused = len(journal) - 2
    assert len(computed) > 2 and (reused == 0 or len(computed) < len(everything))


@pytest.mark.parametrize("change", ["config", "input", "seed"])
def test_a_different_plan_or_changed_inputs_start_over(reference, llama, tmp_path, change):
    config, _, everything = reference
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _merge(config, out, stop_after=len(everything) - 2)
    if change == "config":
        config = config.replace("density: 0.5", "density: 0.6")
    elif change == "seed":
        config = config.replace("random_seed: 7", "random_seed: 8")
    else:
        # the same bytes, but the file was rewritten: its modification time differs
        shard = llama["ft2"] / "model.safetensors"
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        computed = _merge(config, out)
    finally:
        if change == "input":
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(computed) == len(everything)


def test_an_error_leaves_nothing_to_resume(reference, tmp_path, monkeypatch):
    config, _, everything = reference
    out = tmp_path / "out"

    def failing(job, seconds):
        if job.out_name == "model.norm.weight":
            raise ValueError("boom")

    with pytest.raises(ValueError):
        run_merge(config, out, progress=failing, out_shard_size=SHARD)
    assert not _staging(out).exists() and not out.exists()
