"""mergekitty without torch (``pip install mergekitty``, no ``[torch]`` extra).

Each command runs in a subprocess in which torch is not installed (``helpers.without_torch_env``).
A CPU merge whose kernels are all native runs there and writes the same bytes as with torch;
what needs torch stops before writing anything, with one line saying so (exit status 2).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import run_cli, without_torch_env

EXTRA = "needs PyTorch: pip install 'mergekitty[torch]'"


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict[str, str]:
    """The environment of a subprocess without torch."""
    return without_torch_env(tmp_path_factory.mktemp("without-torch"))


@pytest.fixture(scope="module")
def models(llama, tmp_path_factory) -> dict[str, Path]:
    """The llama family and a chat variant of ft1 with two added tokens (for the tokenizer case)."""
    from mergekitty.tiny_models import add_special_tokens

    chat = add_special_tokens(llama["ft1"], tmp_path_factory.mktemp("chat") / "chat", ("<|im_start|>", "<|im_end|>"))
    return {**llama, "chat": chat}


def test_the_harness_hides_torch(no_torch):
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "try:\n    import torch\nexcept ModuleNotFoundError:\n    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    run_cli(shutil.which("python") or "python", "-c", code, env=no_torch)


def test_import_and_help_without_torch(no_torch):
    code = (
        "import sys, mergekitty, mergekitty.api, mergekitty.cli.main, mergekitty.tokenizer\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run_cli(shutil.which("python") or "python", "-c", code, env=no_torch)
    for command in (["mergekitty", "--help"], ["mergekitty-yaml", "--help"], ["mergekitty", "moe", "--help"]):
        proc = run_cli(*command, env=no_torch)
        assert "Usage" in proc.stdout and not proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_quick_start_without_torch(no_torch, tmp_path):
    """The README's quick start: the tiny models and the linear example, without torch; the
    generator writes the same files as with torch."""
    python = shutil.which("python") or "python"
    run_cli(python, "-m", "mergekitty.tiny_models", "tiny-models", cwd=tmp_path, env=no_torch)
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-linear.yml"
    run_cli("mergekitty-yaml", example, "merged-tiny", "--quiet", cwd=tmp_path, env=no_torch)
    assert (tmp_path / "merged-tiny" / "model.safetensors").is_file()
    (tmp_path / "with").mkdir()
    run_cli(python, "-m", "mergekitty.tiny_models", "tiny-models", cwd=tmp_path / "with")
    for model in ("base", "ft2", "chat-tools"):
        assert _files(tmp_path / "tiny-models" / model) == _files(tmp_path / "with" / "tiny-models" / model)


# ---------------------------------------------------------------------------- what runs natively
@dataclass(frozen=True)
class Case:
    name: str
    config: str  # YAML; {base}, {ft1}, {ft2}, {chat}: the model directories
    command: str = "merge"  # or "moe"
    needs_torch: str | None = None  # why it still needs torch (the reason of its strict xfail)

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.needs_torch)] if self.needs_torch else []
        return pytest.param(self, id=self.name, marks=marks)


def _weighted(method: str, extra: str = "", base: bool = True) -> str:
    head = f"merge_method: {method}\n" + ("base_model: {base}\n" if base else "")
    return (
        head
        + f"models:\n  - model: {{ft1}}\n    parameters: {{{{weight: 0.6{extra}}}}}\n"
        + (f"  - model: {{ft2}}\n    parameters: {{{{weight: 0.4{extra}}}}}\n")
    )


def _pair(method: str, parameters: str = "", base: str = "{base}") -> str:
    text = f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {{ft1}}\n  - model: {{ft2}}\n"
    return text + (f"parameters: {{{{{parameters}}}}}\n" if parameters else "")


_MOE = (
    "base_model: {base}\ngate_mode: GATE\ndtype: bfloat16\nexperts:\n"
    "  - source_model: {ft1}\n    positive_prompts: ['w3 w4']\n"
    "  - source_model: {ft2}\n    positive_prompts: ['w20 w21']\n"
)

# Every case that should run without torch, the same bytes as with torch; those that still need
# torch say why. When a kernel lands its case passes, and its strict xfail fails: drop its reason.
CASES = [
    Case("linear", _weighted("linear", base=False)),
    Case("task_arithmetic", _weighted("task_arithmetic")),
    Case("ties", _weighted("ties", ", density: 0.5")),
    Case("dare_ties", _weighted("dare_ties", ", density: 0.5")),
    Case("dare_linear", _weighted("dare_linear", ", density: 0.5")),
    Case("breadcrumbs", _weighted("breadcrumbs", ", density: 0.8, gamma: 0.05")),
    Case("breadcrumbs_ties", _weighted("breadcrumbs_ties", ", density: 0.8, gamma: 0.05")),
    Case("della", _weighted("della", ", density: 0.5, epsilon: 0.1")),
    Case("della_linear", _weighted("della_linear", ", density: 0.5, epsilon: 0.1")),
    Case("passthrough", "merge_method: passthrough\nmodels:\n  - model: {ft1}\n"),
    Case("slerp", _pair("slerp", "t: 0.3", base="{ft1}")),
    Case("multislerp", _weighted("multislerp", base=False)),
    Case("karcher", _pair("karcher").replace("base_model: {base}\n", "")),
    Case("model_stock", _pair("model_stock")),
    Case("sce", _pair("sce", "select_topk: 0.5")),
    Case(
        "nearswap",
        "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {{t: 0.01}}\n",
    ),
    Case(
        "arcee_fusion",
        "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {ft1}\n",
    ),
    Case(
        "tokenizer-union",
        "merge_method: linear\nbase_model: {base}\ntokenizer_source: union\nmodels:\n"
        "  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {chat}\n    parameters: {{weight: 0.5}}\n",
    ),
    Case("moe-random", _MOE.replace("GATE", "random"), "moe"),
    Case("moe-uniform_random", _MOE.replace("GATE", "uniform_random"), "moe"),
    Case("moe-cheap_embed", _MOE.replace("GATE", "cheap_embed"), "moe"),
    Case(
        "moe-noise-and-residual-scale",
        _MOE.replace("GATE", "random").replace("w4']\n", "w4']\n    noise_scale: 0.01\n    residual_scale: 0.5\n", 1),
        "moe",
    ),
]


def _run(case: Case, models: dict[str, Path], out: Path, env: dict[str, str] | None) -> object:
    config = out.parent / "config.yml"
    config.write_text(case.config.format(**{k: str(v) for k, v in models.items()}))
    extra = ["--i-understand-this-is-not-useful-without-training"] if case.command == "moe" else []
    return run_cli("mergekitty", case.command, config, out, "--random-seed", "7", "--quiet", *extra, env=env)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_runs_without_torch_as_with_it(case: Case, models, no_torch, tmp_path):
    """The whole output (weights, tokenizer, card, config copy), byte for byte."""
    (tmp_path / "without").mkdir()
    (tmp_path / "with").mkdir()
    _run(case, models, tmp_path / "without" / "out", no_torch)
    _run(case, models, tmp_path / "with" / "out", None)
    assert _files(tmp_path / "without" / "out") == _files(tmp_path / "with" / "out")


# ---------------------------------------------------------------------------- what needs torch
def _refused(proc, feature: str) -> None:
    """Exit status 2, and the one line that says what needs torch (no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {feature} {EXTRA}" in proc.stderr.splitlines(), proc.stderr


def test_a_tensor_only_torch_computes_names_itself(models, no_torch, tmp_path):
    """Every method has a native kernel; a float64 tensor is one the native kernels do not read."""
    from safetensors.numpy import load_file, save_file

    copies = {}
    for name in ("ft1", "ft2"):
        copies[name] = tmp_path / name
        shutil.copytree(models[name], copies[name])
        weights = copies[name] / "model.safetensors"
        state = load_file(weights)
        state["model.norm.weight"] = state["model.norm.weight"].astype("float64")
        save_file(state, weights, metadata={"format": "pt"})
    config = tmp_path / "config.yml"
    config.write_text(CASES[0].config.format(**{k: str(v) for k, v in {**models, **copies}.items()}))
    out = tmp_path / "out"
    proc = run_cli("mergekitty", "merge", config, out, "--quiet", check=False, env=no_torch)
    _refused(proc, "computing 'model.norm.weight' on CPU (not a float16/bfloat16/float32 tensor)")
    assert not out.exists()


@pytest.fixture
def linear_config(models, tmp_path) -> Path:
    config = tmp_path / "linear.yml"
    config.write_text(CASES[0].config.format(**{k: str(v) for k, v in models.items()}))
    return config


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_needs_torch(linear_config, no_torch, tmp_path, device):
    proc = run_cli(
        "mergekitty", "merge", linear_config, tmp_path / "out", "--device", device, check=False, env=no_torch
    )
    _refused(proc, f"--device {device}")
    assert not (tmp_path / "out").exists()


def test_device_auto_is_the_cpu_without_torch(linear_config, no_torch, tmp_path):
    run_cli("mergekitty", "merge", linear_config, tmp_path / "out", "--device", "auto", "--quiet", env=no_torch)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_bin_checkpoint_needs_torch(models, no_torch, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["ft1"] / f, pickled / f)
    torch.save(load_file(models["ft1"] / "model.safetensors"), pickled / "pytorch_model.bin")
    config = tmp_path / "config.yml"
    config.write_text(_weighted("linear", base=False).format(ft1=pickled, ft2=models["ft2"]))
    proc = run_cli("mergekitty", "merge", config, tmp_path / "out", check=False, env=no_torch)
    _refused(proc, f"reading .bin checkpoints ({pickled / 'pytorch_model.bin'})")


def test_lora_extraction_needs_torch(models, no_torch, tmp_path):
    proc = run_cli(
        "mergekitty", "extract-lora", models["ft1"], models["base"], tmp_path / "out", "--rank", "4",
        check=False, env=no_torch,
    )  # fmt: skip
    _refused(proc, "LoRA extraction")
    assert not (tmp_path / "out").exists()


def test_hidden_state_gates_need_torch(models, no_torch, tmp_path):
    config = tmp_path / "moe.yml"
    config.write_text(_MOE.replace("GATE", "hidden").format(**{k: str(v) for k, v in models.items()}))
    proc = run_cli("mergekitty", "moe", config, tmp_path / "out", check=False, env=no_torch)
    _refused(proc, "hidden-state MoE gates")
    assert not (tmp_path / "out").exists()


def test_applying_a_lora_adapter_needs_torch(models, no_torch, tmp_path):
    from mergekitty import extract_lora

    adapter = tmp_path / "adapter"
    extract_lora(models["ft1"], models["base"], adapter, rank=2)
    proc = run_cli("mergekitty", "merge-lora", models["base"], adapter, tmp_path / "out", check=False, env=no_torch)
    _refused(proc, f"applying a LoRA adapter ({adapter})")
    config = tmp_path / "config.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {models['base']}+{adapter}\n    parameters: {{weight: 1.0}}\n"
    )
    proc = run_cli("mergekitty", "merge", config, tmp_path / "merged", check=False, env=no_torch)
    _refused(proc, f"applying a LoRA adapter ({adapter})")
