"""Every file a model directory refers to must be inside that directory: an index entry with
``..`` or an absolute path, or a shard that is a symlink to elsewhere, is refused with one line
naming the index (or directory) and the entry; the Hugging Face cache layout (snapshot files
linking into the repo's blobs) is still read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from mergekitty.errors import ModelFormatError
from mergekitty.io.checkpoint import Checkpoint


def _sharded(src: Path, dst: Path, shard_name: str) -> Path:
    """A copy of model ``src`` whose weights are listed by an index pointing at ``shard_name``."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    names = list(Checkpoint(dst).infos)
    weights.rename(dst / "moved.safetensors")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard_name)}))
    return dst


@pytest.mark.parametrize("escape", ["../outside/moved.safetensors", "ABSOLUTE"])
def test_an_index_entry_outside_the_model_is_refused(llama, tmp_path, escape):
    outside = tmp_path / "outside"
    outside.mkdir()
    model = _sharded(llama["ft1"], tmp_path / "model", "moved.safetensors")
    shutil.copy(model / "moved.safetensors", outside / "moved.safetensors")
    name = str(outside / "moved.safetensors") if escape == "ABSOLUTE" else escape
    index = model / "model.safetensors.index.json"
    weight_map = {k: name for k in json.loads(index.read_text())["weight_map"]}
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFormatError, match="not a file inside") as info:
        Checkpoint(model)
    assert "model.safetensors.index.json" in str(info.value)


def test_a_shard_symlinked_outside_the_model_is_refused(llama, tmp_path):
    model = _sharded(llama["ft1"], tmp_path / "model", "moved.safetensors")
    elsewhere = tmp_path / "elsewhere.safetensors"
    (model / "moved.safetensors").rename(elsewhere)
    os.symlink(elsewhere, model / "moved.safetensors")
    with pytest.raises(ModelFormatError, match="outside the model directory"):
        Checkpoint(model)
    # the same for a single-file model whose weights are a symlink to elsewhere
    single = tmp_path / "single"
    shutil.copytree(llama["ft2"], single)
    (single / "model.safetensors").rename(tmp_path / "w.safetensors")
    os.symlink(tmp_path / "w.safetensors", single / "model.safetensors")
    with pytest.raises(ModelFormatError, match="outside the model directory"):
        Checkpoint(single)


def test_the_hub_cache_layout_is_still_read(llama, tmp_path):
    """``<repo>/snapshots/<rev>/<file>`` are symlinks into ``<repo>/blobs``: allowed."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in Path(llama["ft1"]).iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        os.symlink(Path("..") / ".." / "blobs" / blob.name, snapshot / f.name)
    assert Checkpoint(snapshot).names() == Checkpoint(Path(llama["ft1"])).names()


def test_the_cli_names_the_escaping_entry_in_one_line(llama, tmp_path):
    model = _sharded(llama["ft1"], tmp_path / "model", "../../etc/passwd")
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    proc = run_cli("mergekitty-yaml", config, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "../../etc/passwd" in proc.stderr and "not a file inside" in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_side_files_symlinked_outside_the_model_are_refused(llama, tmp_path):
    """config.json and the tokenizer are read and copied into the output: a symlink from the model
    to a file elsewhere must not smuggle that file in."""
    from mergekitty.api import run_merge
    from mergekitty.errors import MergekittyError

    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "yours"}')
    for name in ("config.json", "tokenizer.json"):
        model = tmp_path / f"model-{name}"
        shutil.copytree(llama["ft1"], model)
        (model / name).unlink()
        os.symlink(secret, model / name)
        text = f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
        with pytest.raises(MergekittyError, match="outside the model directory"):
            run_merge(text, tmp_path / f"out-{name}", quiet=True)
        assert not (tmp_path / f"out-{name}" / "config.json").exists()
