"""Helpers shared by the test modules: running the commands, reading checkpoints, running models.

Import them with ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``). Heavy
imports (torch, transformers, safetensors) happen inside the functions, so collecting a test
module that only needs ``run_cli`` stays cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "VLM_LAYER_TYPES",
    "VLM_TEXT_LAYERS",
    "VLM_VISION_LAYERS",
    "load_model",
    "model_logits",
    "read_state",
    "run_cli",
    "run_yaml",
    "without_torch_env",
    "task_vector_family",
    "write_tiny_vlm",
]


def run_cli(
    *args: Any, check: bool = True, cwd: str | Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script of the installed package; returns the CompletedProcess.

    ``env``: the environment (default: this process's). With ``check`` (the default) a non-zero
    exit is an AssertionError showing both outputs."""
    exe = shutil.which(args[0]) or args[0]
    proc = subprocess.run(
        [exe, *map(str, args[1:])],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**(os.environ if env is None else env), "COLUMNS": "200"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc


# A sitecustomize that makes torch look uninstalled: the path finder no longer finds ``torch`` or
# ``torch.*`` (``import torch`` raises ModuleNotFoundError, ``importlib.util.find_spec`` gives
# None, as transformers checks) and its distribution metadata is hidden.
_WITHOUT_TORCH = """\
import sys
from importlib.machinery import PathFinder


class _PathFinderWithoutTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            return None
        return PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):
        return (d for d in PathFinder.find_distributions(*args, **kwargs) if d.name != "torch")

    @staticmethod
    def invalidate_caches():
        PathFinder.invalidate_caches()


sys.meta_path[:] = [_PathFinderWithoutTorch if f is PathFinder else f for f in sys.meta_path]
"""


def without_torch_env(directory: str | Path) -> dict[str, str]:
    """This process's environment for a subprocess in which torch is not installed, as after
    ``pip install mergekitty`` without the torch extra: writes ``directory/sitecustomize.py``
    and puts ``directory`` first on PYTHONPATH (pass the result as ``run_cli(..., env=)``)."""
    directory = Path(directory)
    (directory / "sitecustomize.py").write_text(_WITHOUT_TORCH)
    path = [str(directory), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_yaml(config_path: str | Path, out: str | Path, *extra: str, check: bool = True, quiet: bool = True) -> int:
    """``mergekitty-yaml CONFIG OUT --quiet`` in this process (the same click command as the script,
    without the interpreter start-up of a subprocess); returns the exit code. ``quiet=False``
    leaves out ``--quiet`` (notes, warnings and the health summary are printed; no progress bar,
    as stderr is not a terminal).

    With ``check`` (the default) a non-zero exit is an AssertionError."""
    from mergekitty.cli.yaml_cmd import main

    code: int | str | None = 0
    try:
        main([str(config_path), str(out), *(["--quiet"] if quiet else []), *extra], standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    if check and code:
        raise AssertionError(f"mergekitty-yaml {config_path} failed with exit code {code}")
    return int(code or 0)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in directory ``path``, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def load_model(path: str | Path) -> Any:
    """The model in ``path`` in float32, in eval mode (the causal LM, or the image-text-to-text
    model of a vision-language checkpoint)."""
    import torch
    import transformers

    from mergekitty.tiny_models import model_class

    cls = model_class(transformers.AutoConfig.from_pretrained(path))
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def model_logits(path: str | Path) -> torch.Tensor:
    """The logits of the model in ``path`` on a fixed batch of two 8-token sequences."""
    import torch

    model = load_model(path)
    vocab = model.config.get_text_config().vocab_size
    ids = (torch.arange(1, 17).view(2, 8) * 7) % (vocab - 10) + 3
    with torch.no_grad():
        return model(input_ids=ids).logits


def task_vector_family(
    shape: tuple[int, ...], dtype: torch.dtype, k: int = 3, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base tensor and ``k`` fine-tunes of it (``dtype``) whose task vectors hold exact zeros
    and repeated magnitudes (ties), for the GTA kernel tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = []
    for i in range(k):
        d = 0.05 * torch.randn(shape, generator=g)
        if d.numel() > 4:
            d.view(-1)[:: 5 + i] = 0.0  # exact zero task-vector entries
            d.view(-1)[1::7] = 0.03125  # ties
        xs.append((base + d).to(dtype))
    return base.to(dtype), xs


VLM_HIDDEN, VLM_VOCAB = 8, 16
VLM_TEXT_LAYERS, VLM_VISION_LAYERS = 4, 3
VLM_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def write_tiny_vlm(path: Path, seed: int) -> Path:
    """A vision-language checkpoint (random weights from ``seed``) of a language model
    (``model.language_model.layers``), a vision tower (``model.vision_tower.encoder.layers``, with
    its patch embedding and final norm) and a projector without layers, layer counts nested in
    config.json as real ones are. Not loadable by transformers: for planning and weight checks."""
    import json

    import torch
    from safetensors.torch import save_file

    H, V = VLM_HIDDEN, VLM_VOCAB
    g = torch.Generator().manual_seed(seed)
    state = {
        "model.language_model.embed_tokens.weight": [V, H],
        "model.language_model.norm.weight": [H],
        "lm_head.weight": [V, H],
        "model.vision_tower.embeddings.patch_embedding.weight": [H, 3],
        "model.vision_tower.post_layernorm.weight": [H],
        "model.multi_modal_projector.linear.weight": [H, H],
    }
    for i in range(VLM_TEXT_LAYERS):
        state[f"model.language_model.layers.{i}.self_attn.q_proj.weight"] = [H, H]
        state[f"model.language_model.layers.{i}.input_layernorm.weight"] = [H]
    for i in range(VLM_VISION_LAYERS):
        state[f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight"] = [H, H]
        state[f"model.vision_tower.encoder.layers.{i}.layer_norm1.weight"] = [H]
    path.mkdir()
    save_file({k: torch.randn(shape, generator=g) for k, shape in state.items()}, str(path / "model.safetensors"))
    config = {
        "architectures": ["TinyVisionForConditionalGeneration"],
        "model_type": "tiny_vision",
        "text_config": {"num_hidden_layers": VLM_TEXT_LAYERS, "vocab_size": V, "layer_types": VLM_LAYER_TYPES},
        "vision_config": {"num_hidden_layers": VLM_VISION_LAYERS, "hidden_size": H},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path
