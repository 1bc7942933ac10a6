"""The geometric methods on CUDA tensors against the same methods on CPU tensors."""

import importlib

import pytest
import torch

from mergekitty.methods.base import MergeInputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = {
    "slerp": (1, True, dict(t=0.3, nuslerp_flatten=True, nuslerp_row_wise=False)),
    "slerp-rows": (2, True, dict(t=None, nuslerp_flatten=False, nuslerp_row_wise=True)),
    "slerp-cols": (2, False, dict(t=None, nuslerp_flatten=False, nuslerp_row_wise=False)),
    "multislerp": (3, True, dict(normalize_weights=True, eps=1e-8)),
    "karcher": (3, False, dict(max_iter=10, tol=1e-5)),
    "model_stock": (3, True, dict(filter_wise=False)),
    "model_stock-rows": (3, True, dict(filter_wise=True)),
    "nearswap": (1, True, dict(t=0.01)),
    "sce": (3, True, dict(select_topk=0.3, int8_mask=False)),
    "arcee_fusion": (1, True, dict()),
}


def _run(method, xs, base, params, device):
    inputs = MergeInputs(
        name="model.layers.0.mlp.up_proj.weight",
        tensors=[x.to(device) for x in xs],
        model_params=[{"weight": 1.0 + i} for i in range(len(xs))],
        params=params,
        base=None if base is None else base.to(device),
        out_dtype=torch.bfloat16,
    )
    return method.merge(inputs).cpu()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_matches_cpu(case):
    n, with_base, params = CASES[case]
    method = importlib.import_module(f"mergekitty.methods.{case.split('-')[0]}").METHOD
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1024, 768, generator=g) * 0.02
    xs = [(base + 0.002 * torch.randn(1024, 768, generator=g) ** 3).bfloat16() for _ in range(n)]
    base = base.bfloat16() if with_base else None
    cpu = _run(method, xs, base, params, "cpu")
    gpu = _run(method, xs, base, params, "cuda")
    assert gpu.dtype == torch.bfloat16 and torch.isfinite(gpu.float()).all()
    # float32 on both; reductions run in a different order, so allow one bf16 rounding step
    # and, for the selecting methods, a few elements sitting exactly at a threshold
    diff = (gpu.float() - cpu.float()).abs() > 2**-7 * cpu.float().abs() + 1e-6
    assert int(diff.sum()) <= gpu.numel() // 10000, f"{int(diff.sum())} elements differ"
