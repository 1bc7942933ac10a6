"""Planning: the job list, layer renumbering, config rewriting and estimates, with no weights read."""

import json
import shutil

import pytest

from mergekitty.api import plan_merge
from mergekitty.errors import ConfigError, PlanError


def _with_layer_types(src, dst, types):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["layer_types"] = types
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_frankenmerge_renumbers_layers_and_rebuilds_layer_lists(qwen2, tmp_path):
    a = _with_layer_types(
        qwen2["ft1"], tmp_path / "a", ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    )
    b = _with_layer_types(qwen2["ft2"], tmp_path / "b", ["x0", "x1", "x2", "x3"])
    plan = plan_merge(f"""
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
  - sources: [{{model: {a}, layer_range: [3, 4]}}]
merge_method: passthrough
""")
    assert plan.out_config["num_hidden_layers"] == 6
    assert plan.out_config["layer_types"] == [
        "full_attention",
        "sliding_attention",
        "x1",
        "x2",
        "x3",
        "sliding_attention",
    ]
    jobs = {j.out_name: j for j in plan.jobs}
    src = jobs["model.layers.4.mlp.up_proj.weight"].sources[0]
    assert plan.models[src.model].path == b and src.tensor == "model.layers.3.mlp.up_proj.weight"
    src = jobs["model.layers.5.mlp.up_proj.weight"].sources[0]
    assert plan.models[src.model].path == a and src.tensor == "model.layers.3.mlp.up_proj.weight"
    # pre weights from the first slice, post weights from the last
    assert plan.models[jobs["model.embed_tokens.weight"].sources[0].model].path == a
    assert plan.models[jobs["model.norm.weight"].sources[0].model].path == a
    assert [m for m, _ in plan.layer_map] == list(range(6))
    # the output order is pre, layers in order, post; tied head is not written
    assert plan.output_order[0] == "model.embed_tokens.weight" and plan.output_order[-1] == "model.norm.weight"
    assert "lm_head.weight" not in jobs


def test_models_config_keeps_layer_count_and_orders_reads(llama):
    plan = plan_merge(f"""
models:
  - {{model: {llama["ft2"]}, parameters: {{weight: 1}}}}
  - {{model: {llama["ft1"]}, parameters: {{weight: 2}}}}
merge_method: linear
""")
    assert plan.out_config["num_hidden_layers"] == 4
    assert [m.path for m in plan.models] == [llama["ft2"], llama["ft1"]]  # config order, never a set's
    opened = [m.open() for m in plan.models]
    starts = [opened[j.sources[0].model].infos[j.sources[0].tensor].start for j in plan.jobs]
    assert starts == sorted(starts)  # sequential reads
    assert all(j.model_params == ({"weight": 1.0}, {"weight": 2.0}) for j in plan.jobs)
    memory = plan.memory_estimate()
    assert max(j.output_bytes for j in plan.jobs) <= memory.buffers_bytes < plan.output_bytes
    assert max(j.input_bytes for j in plan.jobs) <= memory.mapped_input_bytes < plan.input_bytes


def test_task_arithmetic_base_is_separate_and_params_resolved(llama):
    plan = plan_merge(f"""
base_model: {llama["base"]}
models:
  - model: {llama["ft1"]}
    parameters:
      weight:
        - filter: mlp
          value: 0.25
        - value: 1.0
merge_method: task_arithmetic
parameters: {{normalize: true}}
""")
    for job in plan.jobs:
        assert plan.models[job.base.model].path == llama["base"]
        assert len(job.sources) == 1
        assert job.params == {"normalize": True, "lambda": 1.0}
        assert job.model_params[0]["weight"] == (0.25 if "mlp" in job.out_name else 1.0)


def test_out_dtype_sets_config_and_jobs(llama):
    plan = plan_merge(f"""
models: [{{model: {llama["ft1"]}, parameters: {{weight: 1}}}}]
merge_method: linear
out_dtype: bf16
""")
    assert {j.out_dtype for j in plan.jobs} == {"BF16"}
    key = "dtype" if "dtype" in json.loads((llama["ft1"] / "config.json").read_text()) else "torch_dtype"
    assert plan.out_config[key] == "bfloat16"


def test_base_required(llama):
    with pytest.raises(ConfigError, match="base_model"):
        plan_merge(f"""
models: [{{model: {llama["ft1"]}, parameters: {{weight: 1}}}}]
merge_method: task_arithmetic
""")


def test_shape_mismatch_names_tensor_and_models(llama, tmp_path):
    import transformers

    from mergekitty.tiny_models import make_model

    wide = make_model(tmp_path / "wide", "llama", seed=5, hidden_size=32, intermediate_size=64)
    del transformers
    with pytest.raises(PlanError, match="model.embed_tokens.weight.*shape"):
        plan_merge(f"""
models:
  - {{model: {llama["ft1"]}, parameters: {{weight: 1}}}}
  - {{model: {wide}, parameters: {{weight: 1}}}}
merge_method: linear
""")


def test_different_architectures_need_allow_crimes(llama, mistral):
    from mergekitty.errors import ArchitectureError

    cfg = f"""
models:
  - {{model: {llama["ft1"]}, parameters: {{weight: 1}}}}
  - {{model: {mistral["ft1"]}, parameters: {{weight: 1}}}}
merge_method: linear
"""
    with pytest.raises(ArchitectureError, match="allow-crimes"):
        plan_merge(cfg)
    assert plan_merge(cfg, allow_crimes=True).jobs
