"""The top-level Python API: every entry point is reachable from ``import mergekitty``
without importing torch until one is used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_entry_points_are_the_implementations():
    import mergekitty
    from mergekitty import api, fill_missing, layershuffle, lora, moe, recipe, tokensurgeon

    assert mergekitty.plan_merge is api.plan_merge and mergekitty.MergeOptions is api.MergeOptions
    assert mergekitty.extract_lora is lora.extract_lora and mergekitty.merge_lora is lora.merge_lora
    assert mergekitty.build_moe is moe.build_moe and mergekitty.MoEOptions is moe.MoEOptions
    assert mergekitty.transplant is tokensurgeon.transplant
    assert mergekitty.TokenSurgeonOptions is tokensurgeon.TokenSurgeonOptions
    assert mergekitty.run_recipe is recipe.run_recipe and mergekitty.plan_recipe is recipe.plan_recipe
    assert callable(fill_missing.fill_missing)  # the module of that name, mergekitty.fill_missing
    assert mergekitty.shuffle_config is layershuffle.shuffle_config
    for name in mergekitty.__all__:
        assert getattr(mergekitty, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'merge_loras'"):
        mergekitty.merge_loras  # noqa: B018


def test_import_stays_light():
    code = "import sys, mergekitty; mergekitty.__all__; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_run_merge_takes_a_dict_and_the_plan_reads_well(llama, tmp_path):
    from helpers import read_state
    from mergekitty import plan_merge, run_merge

    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama["ft1"]), "parameters": {"weight": 0.25}},
            {"model": str(llama["ft2"]), "parameters": {"weight": "0.75"}},  # quoted, as mergekit accepts
        ],
        "dtype": "float32",
    }
    run_merge(config, tmp_path / "from-dict", quiet=True)
    a, b, out = read_state(llama["ft1"]), read_state(llama["ft2"]), read_state(tmp_path / "from-dict")
    name = "model.layers.0.mlp.down_proj.weight"
    expected = 0.25 * a[name].float() + 0.75 * b[name].float()  # normalized: the weights sum to 1
    assert (out[name] - expected).abs().max() <= 1e-6

    plan = plan_merge(config)
    text = repr(plan)
    assert text.startswith("<MergePlan linear: 2 models, ") and "\n" not in text and len(text) < 200
    summary = plan.summary()
    assert summary.splitlines()[0] == "method: linear"
    assert f"model 0: {llama['ft1']}" in summary and f"tensors: {len(plan.jobs)} written" in summary
