"""Every file a model directory refers to must be inside that directory: an index entry with
``..`` or an absolute path, or a file that is a symlink to elsewhere (a shard, the index,
``config.json``, any tokenizer or chat template file, a LoRA adapter's files,
``mergekitty_layout.json``), is refused with one line naming the referring file (or directory)
and the entry; the Hugging Face cache layout (snapshot files linking into the repo's blobs) is
still read."""

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


def _link_outside(directory: Path, name: str, content: bytes) -> Path:
    """``directory/name`` as a symlink to a file outside ``directory`` holding ``content``."""
    secret = directory.parent / f"secret-{name}"
    secret.write_bytes(content)
    directory.mkdir(exist_ok=True)
    (directory / name).unlink(missing_ok=True)
    os.symlink(secret, directory / name)
    return secret


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("vocab.json", b'{"a": 0}'),
        ("vocab.txt", b"a\nb\n"),
        ("tokenizer.model", b"\n\x03\n\x01a"),
        ("tokenizer_config.json", b"{}"),
        ("added_tokens.json", b'{"<x>": 1}'),
    ],
)
def test_tokenizer_files_symlinked_outside_the_model_are_refused(tmp_path, name, content):
    from mergekitty.tokenizer.vocab import read_vocabulary

    model = tmp_path / "model"
    model.mkdir()
    if name in ("tokenizer_config.json", "added_tokens.json"):  # read next to a vocabulary
        (model / "vocab.json").write_text('{"a": 0}')
    _link_outside(model, name, content)
    with pytest.raises(ModelFormatError, match=f"'{name}' resolves to .*outside the model directory"):
        read_vocabulary(model)


@pytest.mark.parametrize("name", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_a_chat_template_symlinked_outside_the_model_is_refused(tmp_path, name):
    from mergekitty.tokenizer import model_chat_template

    model = tmp_path / "model"
    text = "{{ messages }}"
    _link_outside(
        model, name, text.encode() if name.endswith(".jinja") else json.dumps({"chat_template": text}).encode()
    )
    with pytest.raises(ModelFormatError, match=f"'{name}' resolves to .*outside the model directory"):
        model_chat_template(model)


def test_copied_tokenizer_files_symlinked_outside_are_refused(llama, tmp_path):
    from mergekitty.tokenizer.write import copy_tokenizer

    model = Path(shutil.copytree(llama["ft1"], tmp_path / "model"))
    _link_outside(model, "merges.txt", b"#version: 0.2\na b\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelFormatError, match="'merges.txt' resolves to .*outside the model directory"):
        copy_tokenizer(model, tmp_path / "out")
    assert not (tmp_path / "out" / "merges.txt").exists()


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_files_symlinked_outside_the_adapter_are_refused(tmp_path, name):
    import torch
    from safetensors.torch import save_file

    from mergekitty.lora.adapter import Adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(2, 8), f"{prefix}.lora_B.weight": torch.zeros(8, 2)},
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    assert Adapter(adapter).modules
    _link_outside(adapter, name, (adapter / name).read_bytes())
    with pytest.raises(ModelFormatError, match=f"'{name}' resolves to .*outside the model directory"):
        Adapter(adapter)


def test_a_layout_file_or_index_symlinked_outside_the_model_is_refused(llama, tmp_path):
    from mergekitty.architecture import model_layout_override

    model = Path(shutil.copytree(llama["ft1"], tmp_path / "model"))
    layout = {"layer_prefix": "model.layers", "pre": ["model.embed_tokens.*"], "post": ["model.norm.*", "lm_head.*"]}
    _link_outside(model, "mergekitty_layout.json", json.dumps(layout).encode())
    with pytest.raises(ModelFormatError, match="'mergekitty_layout.json' resolves to .*outside the model directory"):
        model_layout_override(model)
    (model / "mergekitty_layout.json").unlink()
    assert model_layout_override(model) is None
    names = list(Checkpoint(model).infos)
    _link_outside(
        model,
        "model.safetensors.index.json",
        json.dumps({"weight_map": dict.fromkeys(names, "model.safetensors")}).encode(),
    )
    with pytest.raises(
        ModelFormatError, match="'model.safetensors.index.json' resolves to .*outside the model directory"
    ):
        Checkpoint(model)
