"""Values in messages are written for people: shapes as 4096x11008, dtypes by name, lists as
a, b, c; never Python reprs such as (4096, 11008), torch.bfloat16 or ['a', 'b']."""

from __future__ import annotations

import re
import shutil

import pytest

# what a Python repr leaves in a message
REPR = re.compile(r"\(\d+, \d+|\[\d+, \d+|torch\.\w+|<class |\['|dtype=")


def test_the_formatters():
    import torch

    from mergekitty.text import dtype_text, listing, shape_text

    assert shape_text((4096, 11008)) == "4096x11008" and shape_text(torch.Size([3])) == "3"
    assert shape_text(()) == "scalar"
    assert dtype_text(torch.bfloat16) == "bfloat16" and dtype_text("BF16") == "bfloat16"
    assert dtype_text("F8_E4M3") == "F8_E4M3"  # no better-known name: as the file has it
    assert listing([3, 4]) == "3, 4" and listing(["a b", "c"], quote=True) == "'a b', 'c'"


def test_shape_mismatch_between_models_names_both_shapes(llama, tmp_path):
    """Two models whose MLPs differ in width: the error gives each shape as rows x columns."""
    from safetensors import safe_open

    from mergekitty import PlanError, plan_merge
    from mergekitty.tiny_models import make_model

    wide = make_model(tmp_path / "wide", "llama", intermediate_size=192)
    tensor = "model.layers.0.mlp.down_proj.weight"

    def shape(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return "x".join(map(str, f.get_slice(tensor).get_shape()))

    config = (
        f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n  - model: {wide}\nparameters: {{weight: 0.5}}\n"
    )
    with pytest.raises(PlanError) as err:
        plan_merge(config)
    message = str(err.value)
    assert shape(wide) != shape(llama["ft1"])
    assert f"{wide} has shape {shape(wide)} but {llama['ft1']} has {shape(llama['ft1'])}" in message
    assert not REPR.search(message), message


def test_unsupported_dtype_is_named_as_a_dtype(llama, tmp_path):
    """A pickled checkpoint holding a complex tensor: the dtype is 'complex128', not 'torch.complex128'."""
    import torch

    from mergekitty import ModelFormatError, plan_merge

    model = tmp_path / "complex"
    model.mkdir()
    shutil.copy(llama["ft1"] / "config.json", model / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4, dtype=torch.complex128)}, model / "pytorch_model.bin")
    with pytest.raises(ModelFormatError) as err:
        plan_merge(f"merge_method: passthrough\nmodels:\n  - model: {model}\n")
    message = str(err.value)
    assert "tensor 'model.embed_tokens.weight' has unsupported dtype complex128" in message
    assert not REPR.search(message), message
