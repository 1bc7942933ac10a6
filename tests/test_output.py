"""The output transaction: the new output is staged beside the old one and replaces it in one
step; a failure or interrupt leaves the old output exactly as it was; reruns replace what the
tool wrote and keep what it did not; one run per output."""

import json
import os
import struct

import pytest

from mergekitty import OutputError, run_merge
from mergekitty.io.output import OutputTransaction


def _names(path):
    return sorted(p.name for p in path.iterdir())


def _beside(out):
    """What the transaction may leave next to the output (nothing, after it ends)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _layout(n=3):
    return [(f"t{i}", "F32", [4]) for i in range(n)]


def _data(i):
    return struct.pack("<4f", i, i, i, i)


def _linear(llama, *names):
    models = "".join(f"\n  - model: {llama[n]}\n    parameters: {{weight: 1.0}}" for n in names)
    return f"models:{models}\nmerge_method: linear\n"


class _FailingWriter:
    """A ShardWriter that raises KeyboardInterrupt on its ``after``-th write."""

    def __init__(self, writer, after):
        self.writer, self.after, self.calls = writer, after, 0

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def write(self, name, data):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        self.writer.write(name, data)


@pytest.fixture
def failing_writes(monkeypatch):
    """Every transaction's shard writer fails on its third write."""
    real = OutputTransaction.open_shards

    def open_shards(self, *args, **kwargs):
        return _FailingWriter(real(self, *args, **kwargs), after=3)

    monkeypatch.setattr(OutputTransaction, "open_shards", open_shards)


# ------------------------------------------------------------------ the transaction itself
def test_commit_publishes_everything_and_the_marker_last(tmp_path):
    out = tmp_path / "out"
    with OutputTransaction(out) as txn:
        writer = txn.open_shards(_layout(), 0)
        txn.write_text("README.md", "card\n")
        for i, (name, _, _) in enumerate(_layout()):
            writer.write(name, _data(i))
        assert not out.exists()  # nothing is in place before commit
        published = txn.commit('{"a": 1}\n')
    assert published[-1] == "config.json" and "model.safetensors" in published and "README.md" in published
    assert _names(out) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    assert (out / "README.md").read_text() == "card\n"
    assert _beside(out) == []


@pytest.mark.faults
def test_an_exception_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError), OutputTransaction(out, owned=()) as txn:
        writer = txn.open_shards(_layout(), 20)  # one tensor per shard
        txn.write_text("README.md", "card\n")
        writer.write("t0", _data(0))
        raise ValueError("boom")
    assert _names(out) == ["notes.txt"] and _beside(out) == []


@pytest.mark.faults
def test_a_failed_marker_removes_the_shards_it_would_have_completed(tmp_path, monkeypatch):
    def no_marker(self, text):
        raise OSError("disk full")

    monkeypatch.setattr(OutputTransaction, "_write_marker", no_marker)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full"), OutputTransaction(out) as txn:
        writer = txn.open_shards(_layout(), 20)
        txn.write_text("README.md", "card\n")
        for i, (name, _, _) in enumerate(_layout()):
            writer.write(name, _data(i))
        txn.commit("{}\n")
    assert not out.exists() and _beside(out) == []


@pytest.mark.faults
def test_missing_tensors_fail_the_commit_and_publish_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="never written"), OutputTransaction(out) as txn:
        writer = txn.open_shards(_layout(), 0)
        writer.write("t0", _data(0))
        txn.commit("{}\n")
    assert not out.exists() and _beside(out) == []


def test_leaving_the_block_without_commit_aborts(tmp_path):
    out = tmp_path / "out"
    with OutputTransaction(out) as txn:
        txn.write_text("README.md", "card\n")
        txn.open_shards(_layout(), 0)
    assert not out.exists() and _beside(out) == []
    with pytest.raises(OutputError):
        txn.commit("{}\n")


def test_an_output_path_that_is_a_file_is_an_output_error(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(OutputError), OutputTransaction(tmp_path / "out"):
        pass


# ------------------------------------------------------------------ every command through it
def test_rerun_replaces_the_previous_output_and_keeps_foreign_files(llama, tmp_path):
    out = tmp_path / "out"
    run_merge(_linear(llama, "ft1"), out, quiet=True, out_shard_size=50_000)
    assert "model.safetensors.index.json" in _names(out)
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    run_merge(_linear(llama, "ft1", "ft2"), out, quiet=True, copy_tokenizer=False)
    names = _names(out)
    assert "model.safetensors" in names and "config.json" in names and "notes.txt" in names and "extra" in names
    assert not any(n.startswith(("model-", "tokenizer", ".")) or n.endswith(".index.json") for n in names), names
    assert "ft2" in (out / "README.md").read_text()


def _snapshot(path):
    """Every file under ``path`` with its bytes (what "exactly as it was" means)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def previous_model(llama, tmp_path):
    """An output directory holding an earlier merge and files of the user's."""
    out = tmp_path / "out"
    run_merge(_linear(llama, "ft1"), out, quiet=True)
    (out / "notes.txt").write_text("mine")
    return out


@pytest.mark.faults
def test_a_failed_merge_over_a_previous_output_leaves_it_exactly_as_it_was(llama, previous_model, failing_writes):
    before = _snapshot(previous_model)
    with pytest.raises(KeyboardInterrupt):
        run_merge(_linear(llama, "ft1", "ft2"), previous_model, quiet=True)
    assert _snapshot(previous_model) == before and _beside(previous_model) == []


@pytest.mark.faults
def test_a_failed_lora_merge_leaves_the_previous_output(llama, previous_model, tmp_path, failing_writes):
    from mergekitty.lora import extract_lora, merge_lora

    adapter = tmp_path / "adapter"
    extract_lora(llama["ft1"], llama["base"], adapter, rank=2)
    before = _snapshot(previous_model)
    with pytest.raises(KeyboardInterrupt):
        merge_lora(llama["base"], adapter, previous_model, quiet=True)
    assert _snapshot(previous_model) == before and _beside(previous_model) == []


@pytest.mark.faults
def test_a_failed_moe_build_leaves_the_previous_output(llama, previous_model, failing_writes):
    from mergekitty.moe import build_moe

    config = f"""
base_model: {llama["base"]}
gate_mode: random
experts:
  - source_model: {llama["ft1"]}
  - source_model: {llama["ft2"]}
"""
    before = _snapshot(previous_model)
    with pytest.raises(KeyboardInterrupt):
        build_moe(config, previous_model, random_seed=0, quiet=True)
    assert _snapshot(previous_model) == before and _beside(previous_model) == []


@pytest.mark.faults
def test_a_failed_extraction_leaves_no_adapter(llama, tmp_path, monkeypatch):
    import mergekitty.lora.extract as extract_mod

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def failing_readme(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_mod, "_readme", failing_readme)
    with pytest.raises(KeyboardInterrupt):
        extract_mod.extract_lora(llama["ft1"], llama["base"], out, rank=2)
    assert _names(out) == ["notes.txt"] and _beside(out) == []


# ------------------------------------------------------------------ without an atomic exchange
@pytest.fixture
def no_exchange(monkeypatch):
    """A file system that cannot exchange two directories in one step."""
    import mergekitty.io.output as output

    monkeypatch.setattr(output.platform, "exchange", lambda a, b: False)


def test_without_an_exchange_the_old_output_is_renamed_aside_then_removed(previous_model, llama, no_exchange):
    run_merge(_linear(llama, "ft1", "ft2"), previous_model, quiet=True)
    assert "ft2" in (previous_model / "README.md").read_text()
    assert (previous_model / "notes.txt").read_text() == "mine" and _beside(previous_model) == []


@pytest.mark.faults
def test_a_run_killed_between_the_two_renames_gets_the_old_output_back(previous_model):
    before = _snapshot(previous_model)
    # what a kill between "output -> .old" and "staging -> output" leaves
    old = previous_model.parent / f".{previous_model.name}.mergekitty-old"
    previous_model.rename(old)
    staging = previous_model.parent / f".{previous_model.name}.mergekitty-staging"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    with OutputTransaction(previous_model):
        assert _snapshot(previous_model) == before  # restored as the transaction began
    assert _snapshot(previous_model) == before and _beside(previous_model) == []


@pytest.mark.faults
def test_a_run_killed_after_the_exchange_has_its_cleanup_finished_by_the_next(previous_model, tmp_path):
    # what a kill right after the exchange leaves: the old output at the staging path, with a
    # hard link of the user's file that was carried into the new output
    new_files = _snapshot(previous_model)
    staging = previous_model.parent / f".{previous_model.name}.mergekitty-staging"
    staging.mkdir()
    (staging / "config.json").write_text('{"old": true}')
    (staging / "model.safetensors").write_bytes(b"old weights")
    os.link(previous_model / "notes.txt", staging / "notes.txt")
    (staging / "forgotten.txt").write_text("the user's, never carried")
    with OutputTransaction(previous_model):
        pass
    assert _beside(previous_model) == []
    assert (previous_model / "forgotten.txt").read_text() == "the user's, never carried"
    after = _snapshot(previous_model)
    del after["forgotten.txt"]
    assert after == new_files


def test_a_large_foreign_directory_is_moved_across_after_the_exchange(previous_model, llama, monkeypatch):
    import mergekitty.io.output as output

    monkeypatch.setattr(output, "LINK_TREE_MAX_ENTRIES", 1)
    big = previous_model / "checkpoints"
    big.mkdir()
    for i in range(3):
        (big / f"step{i}.txt").write_text(str(i))
    inode = big.stat().st_ino
    run_merge(_linear(llama, "ft1", "ft2"), previous_model, quiet=True)
    assert big.stat().st_ino == inode  # moved, not copied
    assert sorted(p.name for p in big.iterdir()) == ["step0.txt", "step1.txt", "step2.txt"]
    assert "ft2" in (previous_model / "README.md").read_text() and _beside(previous_model) == []
