"""The plan as the one execution model: the kernel chosen per tensor, the plan as JSON executed by
another process, and the memory the plan predicts against what the executor really allocates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import read_state
from mergekitty import kernels
from mergekitty.api import plan_merge, run_merge
from mergekitty.plan import MergePlan


def _yaml(fam, method: str, params: str = "weight: 0.5", base: bool = True, models=("ft1", "ft2"), extra: str = ""):
    head = f"merge_method: {method}\n" + (f"base_model: {fam['base']}\n" if base else "") + "dtype: bfloat16\n"
    body = "".join(f"  - model: {fam[m]}\n    parameters: {{{params}}}\n" for m in models)
    return head + "random_seed: 5\n" + extra + "models:\n" + body


def _kernels(plan) -> set[str]:
    return {job.kernel.name for job in plan.jobs}


def test_the_plan_chooses_each_kernel(llama):
    assert _kernels(plan_merge(_yaml(llama, "linear", base=False))) == {"native.linear_combination"}
    assert _kernels(plan_merge(_yaml(llama, "ties", "weight: 0.5, density: 0.5"))) == {"native.gta"}
    # the L1 rescale takes a first native pass for its whole-tensor sums
    plan = plan_merge(_yaml(llama, "ties", "weight: 0.5, density: 0.5", extra="parameters: {rescale: true}\n"))
    assert _kernels(plan) == {"native.gta"}
    slerp = plan_merge(_yaml(llama, "slerp", "weight: 0.5", models=("ft1",), extra="parameters: {t: 0.3}\n"))
    assert _kernels(slerp) == {"native.slerp"}
    # one unscaled input in its own dtype is written straight from the map
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {llama['ft1']}\n        layer_range: [0, 2]\n"
    assert _kernels(plan_merge(text)) == {"native.copy"}
    # on a GPU every job is a torch job, whatever the method
    assert _kernels(plan_merge(_yaml(llama, "ties", "weight: 0.5, density: 0.5"), device="cuda:0")) == {"torch"}


@pytest.mark.parametrize(
    "method,params", [("linear", "weight: 0.5"), ("della", "weight: 0.5, density: 0.5"), ("model_stock", "weight: 1")]
)
def test_plan_round_trips_through_json(llama, method, params):
    plan = plan_merge(_yaml(llama, method, params))
    text = plan.to_json()
    again = MergePlan.from_json(text)
    assert again.to_json() == text
    assert again.jobs == plan.jobs and again.models == plan.models and again.method is plan.method
    json.loads(text)  # plain JSON


def test_a_plan_file_names_only_plan_types():
    from mergekitty.errors import PlanError

    with pytest.raises(PlanError, match="unknown type"):
        MergePlan.from_json(json.dumps({"__type__": "Popen", "args": ["true"]}))
    with pytest.raises(PlanError, match="not JSON"):
        MergePlan.from_json("{")


def test_another_process_executes_the_plan_file(llama, tmp_path):
    """The plan written as JSON, executed by a fresh interpreter that never saw the config,
    gives the same tensors, bit for bit, as the merge that planned it."""
    text = _yaml(llama, "dare_ties", "weight: 0.5, density: 0.5")
    plan = run_merge(text, tmp_path / "here", quiet=True)
    (tmp_path / "plan.json").write_text(plan.to_json())
    script = textwrap.dedent(f"""
        from mergekitty import _native
        from mergekitty.execute import execute
        from mergekitty.plan import MergePlan

        plan = MergePlan.from_json(open({str(tmp_path / "plan.json")!r}).read())
        by_name = {{j.out_name: j for j in plan.jobs}}
        layout = [(n, by_name[n].out_dtype, list(by_name[n].shape)) for n in plan.output_order]
        writer = _native.ShardWriter({str(tmp_path / "there")!r}, layout, 0, None, {{}})
        execute(plan, writer, threads=1)
        writer.finalize()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    here, there = read_state(tmp_path / "here"), read_state(tmp_path / "there")
    assert set(here) == set(there)
    for name, tensor in here.items():
        assert tensor.dtype == there[name].dtype and tensor.view(-1).view(__import__("torch").uint8).equal(
            there[name].view(-1).view(__import__("torch").uint8)
        ), name


def test_choose_needs_a_base_for_task_vectors():
    from mergekitty.methods.registry import get_method

    inputs = [kernels.JobInput("BF16", (4, 4), True)]
    params = {"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False}
    got = kernels.choose(get_method("ties"), "w", params, [{"weight": 1.0, "density": 0.5}], inputs, False, (4, 4), "BF16", False, "cpu")  # fmt: skip
    assert isinstance(got, kernels.Torch)


# ---------------------------------------------------------------- the memory estimate
MEMORY_CASES = {
    "linear": ("weight: 0.5", ("ft1", "ft2"), ""),
    "task_arithmetic": ("weight: 0.5", ("ft1", "ft2"), ""),
    "ties": ("weight: 0.5, density: 0.4", ("ft1", "ft2"), ""),
    "dare_ties": ("weight: 0.5, density: 0.4", ("ft1", "ft2"), ""),
    "della": ("weight: 0.5, density: 0.4, epsilon: 0.1", ("ft1", "ft2"), ""),
    "breadcrumbs_ties": ("weight: 0.5, density: 0.4, gamma: 0.01", ("ft1", "ft2"), ""),
    "slerp": ("weight: 0.5", ("ft1",), "parameters: {t: 0.5}\n"),
    "model_stock": ("weight: 1.0", ("ft1", "ft2"), ""),
    "sce": ("weight: 0.5", ("ft1", "ft2"), ""),
}

_MEASURE = """
import json, sys
from mergekitty.api import plan_merge, run_merge
from mergekitty.memory_probe import peak_anonymous_bytes
text, out = open(sys.argv[1]).read(), sys.argv[2]
estimate = plan_merge(text).memory_estimate()
_, before, peak = peak_anonymous_bytes(lambda: run_merge(text, out, quiet=True, threads=2))
print(json.dumps({"estimate": estimate.anonymous_bytes, "peak": peak}))
"""


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Models whose embeddings (16384 x 1024) dominate what a merge allocates."""
    from mergekitty.tiny_models import make_family

    root = tmp_path_factory.mktemp("wide")
    paths = make_family(root, "llama", 2, vocab_size=16384, hidden_size=1024, intermediate_size=2048,
                        num_hidden_layers=2, num_attention_heads=8, tie_word_embeddings=False)  # fmt: skip
    return {"base": paths[0], "ft1": paths[1], "ft2": paths[2]}


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny", "wide"])
@pytest.mark.parametrize("method", list(MEMORY_CASES))
def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(method, shape, llama, wide, tmp_path):
    fam = llama if shape == "tiny" else wide
    params, models, extra = MEMORY_CASES[method]
    config = tmp_path / "merge.yml"
    config.write_text(_yaml(fam, method, params, models=models, extra=extra))
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(config), str(tmp_path / "out")], capture_output=True, text=True, check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["estimate"] / got["peak"]
    assert 0.75 <= ratio <= 1.25, (method, shape, got)


def test_the_plan_places_every_tensor_where_the_writer_writes_it(llama, tmp_path):
    """Each job's shard and offset are in the plan, and the written files hold each tensor there."""
    import struct

    from mergekitty.io.dtypes import nbytes

    text = _yaml(llama, "linear", base=False)
    plan = run_merge(text, tmp_path / "out", quiet=True, out_shard_size=200_000)
    shards = {j.shard for j in plan.jobs}
    assert len(shards) > 1 and all(s.startswith("model-") for s in shards)
    state = read_state(tmp_path / "out")
    for job in plan.jobs:
        raw = (tmp_path / "out" / job.shard).read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        start, stop = header[job.out_name]["data_offsets"]
        assert job.offset == 8 + struct.unpack("<Q", raw[:8])[0] + start
        size = nbytes(job.out_dtype, state[job.out_name].numel())
        assert stop - start == size and job.output_bytes == size


def test_plan_command_prints_kernels_and_writes_the_plan_json(llama, tmp_path):
    from helpers import run_cli

    config = tmp_path / "ties.yml"
    config.write_text(_yaml(llama, "ties", "weight: 0.5, density: 0.5"))
    proc = run_cli("mergekitty", "plan", config, "--json", tmp_path / "plan.json")
    assert "native.gta" in proc.stdout and "allocated" in proc.stdout and "page cache" in proc.stdout
    plan = MergePlan.from_json((tmp_path / "plan.json").read_text())
    assert plan.method.name == "ties" and all(isinstance(j.kernel, kernels.Gta) for j in plan.jobs)
