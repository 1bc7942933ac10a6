"""Killing, interrupting and racing merges that replace an existing model: whatever happens, the
output directory holds the old model or the new one, whole, never a mix and never nothing; two
runs on one output never both write; the user's own files survive."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import read_state
from mergekitty import OutputError, run_merge
from mergekitty.io.output import OutputTransaction

pytestmark = pytest.mark.faults

# A merge run in a child process that SIGKILLs itself at the N-th file-system step (every
# rename, link, unlink, rmdir, mkdir, fsync, exchange and tensor write counts), or counts them.
KILL_AT = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import mergekitty.io.output as output
    from mergekitty import _native

    target, count = int(sys.argv[1]), [0]

    def step():
        count[0] += 1
        if count[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn):
        def wrapper(*args, **kwargs):
            step()
            return fn(*args, **kwargs)
        return wrapper

    for name in ("rename", "link", "unlink", "rmdir", "mkdir", "fsync", "replace"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.rmtree = counted(shutil.rmtree)
    output.platform.exchange = counted(output.platform.exchange)

    RealWriter = _native.ShardWriter

    class Writer:
        def __init__(self, *args, **kwargs):
            self.inner = RealWriter(*args, **kwargs)
        def write(self, name, data):
            step()
            return self.inner.write(name, data)
        def __getattr__(self, name):
            return getattr(self.inner, name)

    _native.ShardWriter = Writer
    from mergekitty.api import run_merge
    run_merge(open(sys.argv[2]).read(), sys.argv[3], quiet=True, out_shard_size=int(sys.argv[4]))
    print("steps", count[0])
    """
)


def _linear(llama, *names):
    models = "".join(f"\n  - model: {llama[n]}\n    parameters: {{weight: 1.0}}" for n in names)
    return f"models:{models}\nmerge_method: linear\n"


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _run_killed_at(step: int, config: Path, out: Path, shard_size: int) -> subprocess.CompletedProcess[str]:
    script = out.parent / "kill_at.py"
    script.write_text(KILL_AT)
    return subprocess.run(
        [sys.executable, str(script), str(step), str(config), str(out), str(shard_size)],
        capture_output=True,
        text=True,
    )


@pytest.fixture
def remerge(llama, tmp_path):
    """An output holding a model (old) and the user's files, a config that makes a different
    one, and that model's tensors (what a complete new output must hold)."""
    old = tmp_path / "old"
    run_merge(_linear(llama, "ft1"), old, quiet=True, out_shard_size=200_000)
    new = tmp_path / "new"
    run_merge(_linear(llama, "ft1", "ft2"), new, quiet=True, out_shard_size=200_000)
    config = tmp_path / "new.yml"
    config.write_text(_linear(llama, "ft1", "ft2"))
    return old, config, read_state(new)


def _fresh_output(tmp_path: Path, old: Path, name: str) -> Path:
    out = tmp_path / "runs" / name
    shutil.copytree(old, out)
    (out / "notes.txt").write_text("mine")
    (out / "own-dir").mkdir()
    (out / "own-dir" / "x").write_text("x")
    return out


def _old_or_new(out: Path, old_snapshot: dict[str, bytes], new_state) -> str:
    """'old' or 'new' if ``out`` holds one of them whole (with the user's files), else fail."""
    assert out.is_dir(), "the output directory is gone"
    now = _snapshot(out)
    assert now.get("notes.txt") == b"mine" and now.get("own-dir/x") == b"x", sorted(now)
    if now == old_snapshot:
        return "old"
    config = json.loads((out / "config.json").read_text())  # the marker: a model is there
    assert config["architectures"]
    state = read_state(out)
    assert state.keys() == new_state.keys()
    for name, tensor in new_state.items():
        assert state[name].equal(tensor), name
    assert not any(n.endswith(".partial") or n.startswith(".") for n in os.listdir(out)), os.listdir(out)
    return "new"


@pytest.mark.slow
def test_kill_9_at_every_step_of_a_remerge_leaves_the_old_model_or_the_new_one(remerge, tmp_path):
    _kill_at_steps(remerge, tmp_path, stride=1)


def test_kill_9_at_every_fifth_step_of_a_remerge_leaves_the_old_model_or_the_new_one(remerge, tmp_path):
    _kill_at_steps(remerge, tmp_path, stride=5)  # odd and even steps: 1, 6, 11, ...


def _kill_at_steps(remerge, tmp_path: Path, stride: int) -> None:
    old, config, new_state = remerge
    probe = _fresh_output(tmp_path, old, "probe")
    done = _run_killed_at(0, config, probe, 200_000)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.split()[-1])
    assert steps > 15  # several shards, side files, the commit's renames and the cleanup
    outcomes = {}
    for step in sorted({*range(1, steps + 1, stride), steps}):
        out = _fresh_output(tmp_path, old, f"k{step}")
        before = _snapshot(out)
        killed = _run_killed_at(step, config, out, 200_000)
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        outcomes[step] = _old_or_new(out, before, new_state)
        if step % 2:
            # the same merge run again (resuming from the shards the killed one completed, if
            # any) writes the new model whole
            run_merge(config.read_text(), out, quiet=True, out_shard_size=200_000)
            assert _old_or_new(out, before, new_state) == "new"
        else:
            # any other run on this output repairs what the killed one left beside it
            with OutputTransaction(out):
                pass
            assert _old_or_new(out, before, new_state) == outcomes[step]
        assert _beside(out) == [], (step, _beside(out))
    # killed early it is the old model, killed late the new one, and it switches exactly once
    sequence = [outcomes[s] for s in sorted(outcomes)]
    assert sequence[0] == "old" and sequence[-1] == "new"
    assert sequence == sorted(sequence, key=("old", "new").index), sequence


def test_kill_9_at_random_moments_of_a_real_run(remerge, tmp_path, llama):
    old, config, new_state = remerge
    for i, delay in enumerate((0.05, 0.2, 0.35, 0.5)):
        out = _fresh_output(tmp_path, old, f"t{i}")
        before = _snapshot(out)
        proc = subprocess.Popen(
            ["mergekitty-yaml", str(config), str(out), "--quiet", "--out-shard-size", "200000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.kill()
        proc.wait()
        _old_or_new(out, before, new_state)
        run_merge(config.read_text(), out, quiet=True, out_shard_size=200_000)  # a rerun completes
        assert _old_or_new(out, before, new_state) == "new" and _beside(out) == []


def test_sigint_during_a_remerge_keeps_the_old_model(remerge, tmp_path):
    old, config, new_state = remerge
    out = _fresh_output(tmp_path, old, "int")
    before = _snapshot(out)
    proc = subprocess.Popen(
        ["mergekitty-yaml", str(config), str(out), "--out-shard-size", "200000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait until the run holds its staging directory, then interrupt it
    deadline = time.monotonic() + 20
    while not (out.parent / f".{out.name}.mergekitty-staging").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    if proc.returncode == 0:  # it finished before the signal arrived
        assert _old_or_new(out, before, new_state) == "new"
    else:
        assert proc.returncode == 130 and "interrupted" in err, err
        assert _snapshot(out) == before
        # what may stay beside it is the staging directory holding complete shards for a rerun
        staging = out.parent / f".{out.name}.mergekitty-staging"
        if staging.exists():
            assert _beside(out) == [staging.name]
            left = os.listdir(staging)
            assert ".mergekitty-journal" in left and all(n.startswith(("model-", ".mergekitty-")) for n in left), left
            assert not any(n.endswith(".partial") for n in left), left
        else:
            assert _beside(out) == []


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(remerge, tmp_path):
    old, config, _ = remerge
    out = _fresh_output(tmp_path, old, "busy")
    before = _snapshot(out)
    with OutputTransaction(out) as first:
        first.write_text("README.md", "first\n")
        second = subprocess.run(["mergekitty-yaml", str(config), str(out), "--quiet"], capture_output=True, text=True)
        assert second.returncode == 1
        assert "being written by another run" in second.stderr and f"pid {os.getpid()}" in second.stderr
        assert "Traceback" not in second.stderr
        with pytest.raises(OutputError, match="being written by another run"):
            run_merge(config.read_text(), out, quiet=True)
        assert _snapshot(out) == before  # nobody wrote into it
    assert _beside(out) == []
    run_merge(config.read_text(), out, quiet=True)  # free again once the first has ended


def test_two_concurrent_runs_one_writes_the_other_is_refused(remerge, tmp_path):
    old, config, new_state = remerge
    out = _fresh_output(tmp_path, old, "race")
    before = _snapshot(out)
    procs = [
        subprocess.Popen(
            ["mergekitty-yaml", str(config), str(out), "--quiet", "--out-shard-size", "200000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for code, err in results:
        assert code == 0 or (code == 1 and "being written by another run" in err), err
    assert any(code == 0 for code, _ in results)
    assert _old_or_new(out, before, new_state) == "new" and _beside(out) == []


def test_a_lock_left_by_a_dead_process_is_taken_over(remerge, tmp_path):
    old, config, new_state = remerge
    out = _fresh_output(tmp_path, old, "stale")
    (out.parent / f".{out.name}.mergekitty-lock").write_text("pid 999999")
    run_merge(config.read_text(), out, quiet=True, out_shard_size=200_000)
    assert _old_or_new(out, {}, new_state) == "new" and _beside(out) == []


def test_a_symlinked_output_is_replaced_behind_the_link(remerge, tmp_path):
    old, config, new_state = remerge
    real = _fresh_output(tmp_path, old, "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    run_merge(config.read_text(), link, quiet=True, out_shard_size=200_000)
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert _old_or_new(real, {}, new_state) == "new" and _beside(real) == []


@pytest.mark.parametrize("case", ["dangling", "loop", "under-a-file", "a-file"])
def test_output_paths_that_cannot_be_a_directory_are_one_line_errors(llama, tmp_path, case):
    out = tmp_path / "out"
    if case == "dangling":
        out.symlink_to(tmp_path / "nowhere")
        expected = "is a symlink to"
    elif case == "loop":
        out.symlink_to(tmp_path / "out2")
        (tmp_path / "out2").symlink_to(out)
        expected = "symlink loop"
    elif case == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        expected = "is not a directory"
    else:
        out.write_text("x")
        expected = "is not a directory"
    config = tmp_path / "c.yml"
    config.write_text(_linear(llama, "ft1"))
    proc = subprocess.run(["mergekitty-yaml", str(config), str(out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_output_directory_is_a_one_line_error(llama, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        config = tmp_path / "c.yml"
        config.write_text(_linear(llama, "ft1"))
        proc = subprocess.run(
            ["mergekitty-yaml", str(config), str(parent / "out"), "--quiet"], capture_output=True, text=True
        )
        assert proc.returncode == 1 and "ermission denied" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------ full and read-only file systems
@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size (in bytes) under tmp_path; skipped where mounting is not allowed."""
    mounted = []

    def mount(size: int, *options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = ",".join([f"size={size}", *options])
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_model_that_cannot_fit_is_refused_before_any_weight_is_read(llama, small_fs, tmp_path):
    fs = small_fs(300_000)  # the tiny merged model is about 650 kB
    config = tmp_path / "c.yml"
    config.write_text(_linear(llama, "ft1"))
    proc = subprocess.run(["mergekitty-yaml", str(config), str(fs / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1 and "not enough free space" in proc.stderr and "needs" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(fs) == []


@pytest.mark.parametrize("after_jobs", [1, 30, 39])  # 39: the last tensor, so the commit hits it
def test_the_disk_filling_up_mid_merge_is_one_line_and_keeps_the_old_model(remerge, small_fs, after_jobs):
    old, config, _ = remerge
    out = _fresh_output(small_fs(4_000_000), old, "out")
    before = _snapshot(out)
    done = []

    def fill_the_disk(job, seconds):  # another program takes all the space that is left
        done.append(job)
        if len(done) == after_jobs:
            with open(out.parent / "filler", "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()

    with pytest.raises(OutputError, match="no space left on device"):
        run_merge(config.read_text(), out, progress=fill_the_disk, out_shard_size=200_000)
    assert _snapshot(out) == before and _beside(out) == []


def test_a_read_only_file_system_is_a_one_line_error(remerge, small_fs, tmp_path):
    old, config, _ = remerge
    fs = small_fs(4_000_000)
    shutil.copytree(old, fs / "out")
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    before = _snapshot(fs / "out")
    proc = subprocess.run(["mergekitty-yaml", str(config), str(fs / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1 and "read-only file system" in proc.stderr.lower(), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert _snapshot(fs / "out") == before


@pytest.mark.parametrize("where", ["lock", "staging", "finalize", "exchange"])
def test_file_system_errors_at_each_step_are_one_output_error_and_keep_the_old_model(
    remerge, tmp_path, monkeypatch, where
):
    """Permission denied (as a non-root user would get it) or an I/O error at each step of the
    transaction: an OutputError naming the output, the old model as it was, nothing beside."""
    import mergekitty.io.output as output

    old, config, _ = remerge
    out = _fresh_output(tmp_path, old, "out")
    before = _snapshot(out)
    denied = PermissionError(13, "Permission denied", str(out.parent))
    if where == "lock":
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if str(path).endswith(".mergekitty-lock"):
                raise denied
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(output.os, "open", refusing_open)
    elif where == "staging":
        real_mkdir = Path.mkdir

        def refusing_mkdir(self, *args, **kwargs):
            if self.name.endswith(".mergekitty-staging"):
                raise denied
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    elif where == "finalize":
        from mergekitty import _native

        real = _native.ShardWriter

        class FailingFinalize:
            def __init__(self, *args, **kwargs):
                self.writer = real(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(self.writer, name)

            def finalize(self):
                raise OSError(5, "Input/output error", "x")

        monkeypatch.setattr(_native, "ShardWriter", FailingFinalize)
    else:
        monkeypatch.setattr(
            output.platform, "exchange", lambda a, b: (_ for _ in ()).throw(OSError(5, "Input/output error"))
        )
    with pytest.raises(OutputError) as caught:
        run_merge(config.read_text(), out, quiet=True)
    message = str(caught.value)
    assert str(out) in message and "\n" not in message
    assert ("Permission denied" if where in ("lock", "staging") else "Input/output error") in message
    assert _snapshot(out) == before and _beside(out) == []
