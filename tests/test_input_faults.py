"""An input file that shrinks, is replaced or rewritten while a merge reads it.

Inputs are memory-mapped: a read past the end of a file that shrank would kill the process with
SIGBUS. Each case truncates (or swaps) an input shard after the first job and expects a typed
error naming the file, the process alive (exit status 1, not 135) and nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergekitty.api import run_merge
from mergekitty.errors import ModelFormatError

pytestmark = pytest.mark.faults

# Methods whose jobs read the maps in each of the three places a read can happen: a native kernel
# (linear), torch over views of the maps (slerp), and the shard writer copying a mapped tensor
# straight to the output (passthrough).
CONFIGS = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters: {{t: 0.5}}
dtype: float32
""",
    "passthrough": """
merge_method: passthrough
models:
  - model: {b}
dtype: float32
""",
}

# Runs the CLI with the executor's release hook (called when a job is done with its inputs)
# truncating the victim after the first job.
DRIVER = """
import os, sys
from mergekitty.io import checkpoint

victim, keep = sys.argv[1], int(sys.argv[2])
release = checkpoint.Checkpoint.release

def release_then_truncate(self, name):
    release(self, name)
    if os.path.getsize(victim) > keep:
        os.truncate(victim, keep)

checkpoint.Checkpoint.release = release_then_truncate
from mergekitty.cli.yaml_cmd import main
main(sys.argv[3:], prog_name="mergekitty-yaml")
"""


def _inputs(llama, tmp_path: Path) -> tuple[Path, Path]:
    """Private copies of two models (the family is shared by the session)."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(llama["ft1"], a)
    shutil.copytree(llama["ft2"], b)
    return a, b


def _assert_nothing_written(out: Path) -> None:
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert not [n for n in left if n.endswith(".partial") or n.endswith(".safetensors")], left
    assert "config.json" not in left and "model.safetensors.index.json" not in left, left


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_input_truncated_during_a_merge_is_a_typed_error(llama, tmp_path, method):
    a, b = _inputs(llama, tmp_path)
    victim = b / "model.safetensors"
    size = victim.stat().st_size
    out = tmp_path / "out"
    jobs: list[str] = []

    def truncate_after_first_job(job, _seconds):
        jobs.append(job.out_name)
        if len(jobs) == 1:
            os.truncate(victim, 8192)  # every tensor after the first few is now past the end

    with pytest.raises(ModelFormatError) as info:
        run_merge(CONFIGS[method].format(a=a, b=b), out, progress=truncate_after_first_job, quiet=True)
    message = str(info.value)
    assert str(victim) in message and "changed during the merge" in message, message
    assert f"was {size} bytes, now 8192" in message and "\n" not in message, message
    assert len(jobs) < 5  # stopped at the next job that read the file, not at the end
    _assert_nothing_written(out)


def test_cli_exits_1_naming_the_truncated_file(llama, tmp_path):
    a, b = _inputs(llama, tmp_path)
    victim = b / "model.safetensors"
    config = tmp_path / "linear.yml"
    config.write_text(CONFIGS["linear"].format(a=a, b=b))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(victim), "8192", str(config), str(out), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        timeout=120,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # -7 / 135: killed by SIGBUS
    assert "changed during the merge" in proc.stderr and str(victim) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_nothing_written(out)


def test_input_replaced_during_a_merge_is_a_typed_error(llama, tmp_path):
    """A file swapped for another (same size, so nothing faults) is caught by its inode."""
    a, b = _inputs(llama, tmp_path)
    victim = b / "model.safetensors"
    out = tmp_path / "out"

    def swap_after_first_job(job, _seconds):
        if not (tmp_path / "swapped").exists():
            (tmp_path / "swapped").touch()
            shutil.copyfile(a / "model.safetensors", tmp_path / "other")
            os.replace(tmp_path / "other", victim)

    with pytest.raises(ModelFormatError, match="replaced by another file") as info:
        run_merge(CONFIGS["linear"].format(a=a, b=b), out, progress=swap_after_first_job, quiet=True)
    assert str(victim) in str(info.value)
    _assert_nothing_written(out)


def test_untouched_inputs_merge_as_before(llama, tmp_path):
    a, b = _inputs(llama, tmp_path)
    out = tmp_path / "out"
    run_merge(CONFIGS["linear"].format(a=a, b=b), out, quiet=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_native_file_check_intact(llama, tmp_path):
    from mergekitty import _native

    _, b = _inputs(llama, tmp_path)
    path = b / "model.safetensors"
    f = _native.SafetensorsFile(path)
    f.check_intact()
    last = f.tensors()[-1][0]
    view = memoryview(f.view(last))
    os.truncate(path, 4096)
    assert bytes(view[:4]) == b"\0\0\0\0"  # the read past the end is zeros, not a SIGBUS
    with pytest.raises(ModelFormatError, match=r"changed during the merge \(was \d+ bytes, now 4096\)"):
        f.check_intact()


def test_shard_writer_copying_a_truncated_map_survives(llama, tmp_path):
    """The writer reads a mapped tensor itself (a copied tensor is never touched in Python)."""
    from mergekitty import _native
    from mergekitty.errors import FileIOError

    _, b = _inputs(llama, tmp_path)
    path = b / "model.safetensors"
    f = _native.SafetensorsFile(path)
    name, dtype, shape, _, _ = f.tensors()[-2]  # a large tensor near the end
    view = f.view(name)
    os.truncate(path, 4096)
    writer = _native.ShardWriter(tmp_path / "out", [(name, dtype, shape)], 1 << 30)
    try:
        writer.write(name, view)  # page-cache writes: EFAULT; direct writes: zeros
    except FileIOError:
        pass
    finally:
        writer.abort()
    with pytest.raises(ModelFormatError, match="changed during the merge"):
        f.check_intact()


def test_checkpoint_release_stops_at_a_changed_input(llama, tmp_path):
    """Every reader (merges, LoRA merges and extraction, MoE builds) releases what it read: the
    release is where a file that changed under the read is caught."""
    from mergekitty.io.checkpoint import Checkpoint

    _, b = _inputs(llama, tmp_path)
    ckpt = Checkpoint(b)
    last = max(ckpt.infos.values(), key=lambda i: i.start).name
    os.truncate(b / "model.safetensors", 4096)
    assert float(ckpt.tensor(last).abs().sum()) == 0.0  # zeros instead of a SIGBUS
    with pytest.raises(ModelFormatError, match="changed during the merge"):
        ckpt.release(last)


def test_lora_merge_of_a_truncated_base_is_a_typed_error(llama, tmp_path):
    from mergekitty.lora.extract import extract_lora
    from mergekitty.lora.merge import merge_lora

    adapter = tmp_path / "adapter"
    extract_lora(llama["ft1"], llama["base"], adapter, rank=4)
    base = tmp_path / "base"
    shutil.copytree(llama["base"], base)
    victim = base / "model.safetensors"
    out = tmp_path / "out"

    def truncate_after_first(_name, done, _total):
        if done == 1:
            os.truncate(victim, 8192)

    with pytest.raises(ModelFormatError, match="changed during the merge") as info:
        merge_lora(base, adapter, out, progress=truncate_after_first, copy_tokenizer=False)
    assert str(victim) in str(info.value)
    _assert_nothing_written(out)
