"""The torch CUDA path (`--device cuda`) against the native CPU path, on tiny fixture models."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest helpers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _state(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from mergekitty.tiny_models import make_family

    paths = make_family(tmp_path_factory.mktemp("fam"), "llama", 2)
    return dict(zip(("base", "ft1", "ft2"), paths))


CONFIGS = {
    "linear": "models:\n  - {{model: {ft1}, parameters: {{weight: 0.7}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4}}}}\nmerge_method: linear\nout_dtype: bfloat16\n",
    "task_arithmetic": "base_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: [0.2, 0.9]}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.5}}}}\nmerge_method: task_arithmetic\nparameters: {{lambda: 0.8}}\n",
    "passthrough": "slices:\n  - sources: [{{model: {ft1}, layer_range: [0, 3]}}]\n  - sources: [{{model: {ft2}, layer_range: [1, 4]}}]\nmerge_method: passthrough\n",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_matches_cpu(family, tmp_path, name):
    from mergekitty import run_merge

    cfg = CONFIGS[name].format(**family)
    run_merge(cfg, tmp_path / "cpu", device="cpu", quiet=True)
    run_merge(cfg, tmp_path / "cuda", device="cuda", quiet=True)
    cpu, gpu = _state(tmp_path / "cpu"), _state(tmp_path / "cuda")
    assert set(cpu) == set(gpu)
    for k in cpu:
        assert cpu[k].dtype == gpu[k].dtype
        # float32 arithmetic on both; the GPU may fuse multiply-adds: at most one rounding step apart
        rtol = 2**-7 if cpu[k].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(gpu[k].float(), cpu[k].float(), atol=1e-6, rtol=rtol)


def test_merged_model_runs_on_cuda(family, tmp_path):
    import transformers

    from mergekitty import run_merge

    run_merge(CONFIGS["linear"].format(**family), tmp_path / "out", device="cuda", quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).cuda()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 9, device="cuda").view(1, 8)).logits
    assert torch.isfinite(logits).all()
