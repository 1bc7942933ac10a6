"""The fused native GTA kernel (``kernels.Gta``: ops.native_dispatch.gta_merge, task vectors never
materialized) against the torch reference of the same spec (``MergeMethod.merge`` -> methods.gta.
gta_reference: float32 task vectors, the sparsifiers, combine), which is itself tested against the
plain torch formulas.

Every per-element float32 operation is the same in both, in the same order, so the outputs are
bit-identical (compared with torch.equal on the raw bits), for every thread count."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers import task_vector_family  # noqa: E402
from mergekitty import kernels  # noqa: E402
from mergekitty.methods.base import MergeInputs  # noqa: E402
from mergekitty.methods.registry import get_method  # noqa: E402
from mergekitty.ops import native_dispatch  # noqa: E402

SHAPES = [(7,), (1,), (13, 257), (3, 1), (64, 1031)]
DTYPES = [torch.bfloat16, torch.float32]


def _params(method, k, density):
    mp = []
    for i in range(k):
        p = {"weight": [0.5, -0.3, 0.2, 0.7][i], "density": density}
        if "breadcrumbs" in method:
            p["gamma"] = 0.05
        if "della" in method:
            p["epsilon"] = min(0.05, density / 2, (1 - density) / 2) if 0 < density < 1 else 0.1
            p["lambda"] = None
        mp.append(p)
    params = {"lambda": 0.8}
    m = get_method(method)
    for spec in m.global_params:
        params.setdefault(spec.name, spec.default)
    return mp, params


def _run(method, base, xs, mp, params, out_dtype, fused, threads=None, out=None):
    """The merge of one tensor: the fused native kernel (``fused``) or the torch reference."""
    m = get_method(method)
    name = "model.layers.0.w"
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if fused:
            spec = m.compute.spec(params, mp, name)
            assert spec.native
            return native_dispatch.gta_merge(xs, base, spec, 1234, out_dtype, out)
        return m.merge(MergeInputs(name, list(xs), mp, params, base=base, out_dtype=out_dtype, out=out, seed=1234))
    finally:
        torch.set_num_threads(old)


def _bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


METHODS = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.5, 0.9, 1e-3, 1.0])
def test_fused_matches_unfused(method, dtype, shape, density):
    base, xs = task_vector_family(shape, dtype)
    mp, params = _params(method, len(xs), density)
    ref = _run(method, base, xs, mp, params, dtype, fused=False)
    got = _run(method, base, xs, mp, params, dtype, fused=True, threads=1)
    assert _bits_equal(got, ref), (got - ref).abs().max()
    got2 = _run(method, base, xs, mp, params, dtype, fused=True, threads=2)
    assert _bits_equal(got2, ref)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_large_multithreaded_and_out_buffer(method):
    # big enough that the kernels split the work across threads
    base, xs = task_vector_family((300, 1000), torch.bfloat16, seed=3)
    mp, params = _params(method, 3, 0.3)
    ref = _run(method, base, xs, mp, params, torch.bfloat16, fused=False)
    out = torch.empty_like(base)
    got = _run(method, base, xs, mp, params, torch.bfloat16, fused=True, threads=2, out=out)
    assert got is out
    assert _bits_equal(got, ref)
    f32 = _run(method, base, xs, mp, params, torch.float32, fused=True, threads=1)
    f32_ref = _run(method, base, xs, mp, params, torch.float32, fused=False)
    assert _bits_equal(f32, f32_ref)


def test_nan_and_inf():
    base, xs = task_vector_family((11, 37), torch.float32, seed=5)
    xs[0].view(-1)[[3, 50, 100]] = float("nan")
    xs[1].view(-1)[[4, 60]] = float("inf")
    xs[2].view(-1)[[5]] = float("-inf")
    for method in ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "della_linear"]:
        for density in [0.5, 1e-3]:
            mp, params = _params(method, 3, density)
            ref = _run(method, base, xs, mp, params, torch.float32, fused=False)
            got = _run(method, base, xs, mp, params, torch.float32, fused=True)
            assert _bits_equal(got, ref), method


L1 = [("ties", "rescale"), ("breadcrumbs_ties", "rescale"), ("dare_ties", "rescale_l1"), ("della_linear", "rescale_l1")]


@pytest.mark.parametrize("method,key", L1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (64, 1031)])
@pytest.mark.parametrize("normalize", [False, True])
def test_l1_rescale_matches_the_reference(method, key, dtype, shape, normalize):
    """The L1 rescale: a first native pass per model for sum|kept|, then the factor applied in
    the fused pass. Not bit-identical (the factor is taken from base + kept in float32 and folded
    into the weight): within a few float32 roundings of the result's scale."""
    base, xs = task_vector_family(shape, dtype, seed=7)
    mp, params = _params(method, len(xs), 0.4)
    params = {**params, key: True, "normalize": normalize}
    ref = _run(method, base, xs, mp, params, torch.float32, fused=False)
    got = _run(method, base, xs, mp, params, torch.float32, fused=True, threads=2)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 4e-6 * scale
    plain = _run(method, base, xs, mp, {**params, key: False}, torch.float32, fused=True)
    assert not torch.allclose(plain, got)  # the rescale changed the result


def _choice(method, params, mp, shapes=((5, 9),) * 4, mapped=True, dtype="F32", device="cpu"):
    inputs = [kernels.JobInput(dtype, shape, mapped) for shape in shapes]
    return kernels.choose(get_method(method), "w", params, mp, inputs, True, shapes[0], dtype, False, device)


def test_plan_chooses_torch_where_the_fused_kernel_does_not_apply():
    mp, params = _params("ties", 3, 0.5)
    assert isinstance(_choice("ties", params, mp), kernels.Gta)
    mp, params = _params("dare_ties", 3, 0.5)
    assert isinstance(_choice("dare_ties", params, mp, shapes=((5, 9), (6, 9), (5, 9), (5, 9))), kernels.Torch)
    assert isinstance(_choice("dare_ties", params, mp, mapped=False), kernels.Torch)  # pickled / model+lora
    # integer tensors are copied when every input holds the same bytes, natively
    assert _choice("dare_ties", params, mp, dtype="I64") == kernels.CopyIfEqual(0)
    assert isinstance(_choice("dare_ties", params, mp, device="cuda"), kernels.Torch)


def test_reference_handles_what_the_plan_sends_to_torch():
    base, xs = task_vector_family((5, 9), torch.float32)
    mp, params = _params("ties", 3, 0.5)
    params["rescale"] = True
    get_method("ties").merge(MergeInputs("w", xs, mp, params, base=base, out_dtype=torch.float32))
    mp, params = _params("dare_ties", 3, 0.5)
    params["rescale_l1"] = True
    get_method("dare_ties").merge(MergeInputs("w", xs, mp, params, base=base, out_dtype=torch.float32, seed=1))
    # an input of another shape (embedding crop)
    big = torch.randn(6, 9)
    mp, params = _params("ties", 3, 0.5)
    get_method("ties").merge(
        MergeInputs("model.embed_tokens.weight", [big, *xs[1:]], mp, params, base=base, out_dtype=torch.float32)
    )


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 70001, (1 << 20) + 4099])  # the last takes the sampled thresholds
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_thresholds_at_every_size(n, method):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(3)]
    if n > 10:
        xs[0][:5] = base[:5]  # zeros
        xs[1][3] = float("nan")
        xs[2][4] = float("inf")
    for density in (0.3, 0.9):
        mp, params = _params(method, 3, density)
        ref = _run(method, base, xs, mp, params, torch.bfloat16, fused=False)
        for threads in (1, 2):
            got = _run(method, base, xs, mp, params, torch.bfloat16, fused=True, threads=threads)
            assert _bits_equal(got, ref), (method, density, threads)


# ---------------------------------------------------------------- the executor's torch-free path
_E2E_METHODS = {
    "ties": "density: 0.5",
    "dare_ties": "density: 0.6",
    "dare_linear": "density: 0.6",
    "della": "density: 0.5, epsilon: 0.1",
    "breadcrumbs_ties": "density: 0.6, gamma: 0.05",
}


def _e2e_config(fam, method: str, dtype: str) -> str:
    params = _E2E_METHODS[method]
    return (
        f"merge_method: {method}\nbase_model: {fam['base']}\ndtype: {dtype}\nrandom_seed: 11\n"
        f"parameters: {{normalize: true}}\nmodels:\n"
        f"  - model: {fam['ft1']}\n    parameters: {{weight: 0.6, {params}}}\n"
        f"  - model: {fam['ft2']}\n    parameters: {{weight: 0.4, {params}}}\n"
    )


@pytest.mark.parametrize("method", list(_E2E_METHODS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_executor_native_kernels_equal_the_torch_reference(method, dtype, llama, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mergekitty import plan as plan_module
    from mergekitty.api import run_merge

    text = _e2e_config(llama, method, dtype)
    native = run_merge(text, tmp_path / "native", quiet=True)
    assert any(isinstance(j.kernel, kernels.Gta) for j in native.jobs)
    # the reference: the plan sends every job to the torch function (task vectors, sparsifiers, combine)
    monkeypatch.setattr(plan_module, "choose", lambda *a, **k: kernels.Torch("test"))
    run_merge(text, tmp_path / "unfused", quiet=True)
    got, want = (
        load_file(tmp_path / "native" / "model.safetensors"),
        load_file(tmp_path / "unfused" / "model.safetensors"),
    )
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name].view(torch.uint8) if got[name].dtype != torch.float32 else got[name].view(torch.int32),
                           want[name].view(torch.uint8) if want[name].dtype != torch.float32 else want[name].view(torch.int32)), name  # fmt: skip


def test_ties_merge_on_cpu_never_imports_torch(llama, tmp_path):
    import subprocess
    import sys

    config = tmp_path / "ties.yml"
    config.write_text(_e2e_config(llama, "ties", "bfloat16"))
    code = (
        "import sys, mergekitty\n"
        f"mergekitty.run_merge({str(config)!r}, {str(tmp_path / 'out')!r}, quiet=True)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"
