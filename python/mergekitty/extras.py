"""What needs an optional dependency, and the one error that says which to install.

A CPU merge with the native kernels needs no torch; ``pip install 'mergekitty[torch]'`` adds
it for what does: ``--device cuda``, pickled ``.bin`` checkpoints, LoRA adapters (applying and
extracting), hidden-state MoE gates, and the tensors whose kernel is the method's torch function (a method
with no native kernel yet). Every such place calls ``require_torch`` with what it is doing, so
the message is the same everywhere; nothing here imports torch unless it is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import MissingExtraError

if TYPE_CHECKING:
    from .plan import MergePlan

TORCH_EXTRA = "pip install 'mergekitty[torch]'"


# what transformers says at import when it finds no torch (the wording of versions 4 and 5):
# expected without the extra, and only noise for the tokenizers and configs mergekitty uses it for
_NO_TORCH_NOTICES = ("None of PyTorch, TensorFlow", "PyTorch was not found")


class _NoTorchNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_TORCH_NOTICES)


def quiet_transformers_without_torch() -> None:
    """Drop transformers' notice that it found no torch (and nothing else it logs)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _NoTorchNotice) for f in logger.filters):
        logger.addFilter(_NoTorchNotice())


def torch_available() -> bool:
    """Whether torch is installed (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def require_torch(feature: str) -> ModuleType:
    """The torch module; ``MissingExtraError`` naming ``feature`` when torch is not installed."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.partition(".")[0] != "torch":
            raise  # torch is there but one of its own dependencies is not: its error says which
        raise MissingExtraError(feature, "PyTorch", TORCH_EXTRA) from None
    return torch


def resolve_device(device: str) -> str:
    """``device`` with ``auto`` resolved: CUDA when torch sees a CUDA device, else the CPU (always,
    without torch). Any device but the CPU needs torch."""
    if device == "auto":
        if not torch_available():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        require_torch(f"--device {device}")
    return device


def require_torch_for_plan(plan: MergePlan) -> None:
    """Before anything is written: ``MissingExtraError`` when a job of ``plan`` runs the method's
    torch function and torch is missing, naming the method when the reason is that it has no
    native kernel (as each kernel lands, fewer plans get here; with every method and tensor kind
    native, this check has nothing left to find)."""
    from .kernels import Torch

    if torch_available():
        return
    for model in plan.models:
        if model.stage is not None:  # a recipe stage computed as this plan reads it
            require_torch_for_plan(model.stage)
    found = next(((j.out_name, j.kernel.reason) for j in plan.jobs if isinstance(j.kernel, Torch)), None)
    if found is None:
        return
    tensor, reason = found
    if reason.endswith("has no native kernel"):
        require_torch(f"the {plan.method.name} merge method on CPU")
    require_torch(f"computing '{tensor}' on CPU ({reason})")
