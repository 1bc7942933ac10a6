"""A base model with a LoRA adapter applied, read tensor by tensor.

``LoraCheckpoint`` has the interface of ``io.checkpoint.Checkpoint`` (``infos``, ``names``,
``tensor``, ``view``, ``prefetch``, ``release``, ``config``), so the planner and the
executor use a ``model+lora`` input like any other model. Tensors the adapter leaves
alone are the base's zero-copy memory maps; a changed tensor is computed when it is
loaded, ``W + scale * B @ A`` in float32 and cast back to the base dtype. With a
``merge_dtype`` (``--lora-merge-dtype``) every float tensor of the adapted model is
in that dtype instead. Nothing is written to disk and no full model is held in memory.

Every check that needs no tensor data (an adapter module that matches no base tensor,
factor shapes that do not fit the base, an embedding resized inconsistently) is done
when the object is built, so a bad adapter fails at plan time.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from ..io.checkpoint import Checkpoint, TensorInfo
from ..io.dtypes import nbytes, torch_dtype
from ..sizes import numel
from ..text import shape_text
from .adapter import Adapter, LoraModule

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Op:
    kind: str  # "lora", "full" or "bias"
    dtype: str  # safetensors code of the result
    shape: tuple[int, ...]
    lora: LoraModule | None = None
    source: tuple[str, str] | None = None  # ("base" | "adapter", tensor name): the tensor changed
    key: str | None = None  # "full": the adapter tensor


class LoraCheckpoint:
    """``base`` with ``adapter`` applied; a drop-in for ``Checkpoint``."""

    def __init__(
        self,
        base: Checkpoint,
        adapter: Adapter,
        label: str | None = None,
        device: str = "cpu",
        merge_dtype: str | None = None,
    ):
        from ..extras import require_torch

        # W + scale * B @ A: a matrix product per changed tensor, in torch
        require_torch(f"applying a LoRA adapter ({adapter.label})")
        self.base = base
        self.merge_dtype = merge_dtype  # safetensors code the changed tensors are rounded to; None: the base's
        self.adapter = adapter
        self.directory = base.directory
        self.files = base.files
        self.label = label or f"{base.label}+{adapter.label}"
        self.device = device
        self._config = copy.deepcopy(base.config())
        self._ops: dict[str, _Op] = {}
        self.infos: dict[str, TensorInfo] = dict(base.infos)
        self._plan()

    # ------------------------------------------------------------------ planning
    def _error(self, message: str) -> PlanError:
        return PlanError(f"LoRA adapter {self.adapter.label} on {self.base.label}: {message}")

    def _input_embedding(self) -> str | None:
        from ..architecture.layout import infer_layout

        try:
            return infer_layout(self.base.names(), self._config, where=self.base.label).input_embedding
        except Exception:  # an unusual layout only loses the tied-head handling
            return None

    def _resolve(self, target: str) -> tuple[str, str] | None:
        """Where the tensor ``target`` changed by the adapter comes from: the adapter's
        replacement base, the base tensor, or (a head missing from a model with tied
        embeddings) the base's input embedding."""
        from ..architecture.layout import is_embedding_name

        if target in self.adapter.base_layers:
            return ("adapter", self.adapter.base_layers[target])
        if target in self.base.infos:
            return ("base", target)
        embedding = self._input_embedding()
        if embedding is not None and is_embedding_name(target) and target.endswith(".weight") and target != embedding:
            return ("base", embedding)
        return None

    def _source_info(self, source: tuple[str, str]) -> TensorInfo:
        where, name = source
        return (self.adapter.checkpoint if where == "adapter" else self.base).infos[name]

    def _plan(self) -> None:
        from ..architecture.layout import is_embedding_name

        added: list[str] = []
        for target, lora in self.adapter.modules.items():
            source = self._resolve(target)
            if source is None:
                raise self._error(
                    f"module '{lora.module}' matches no tensor of the base (no '{target}'; is the adapter for a different model?)"
                )
            info = self._source_info(source)
            a_shape, b_shape = self.adapter.factor_shapes(lora)
            want = lora.delta_shape(a_shape, b_shape)
            if tuple(info.shape) != want:
                layout = "fan_in_fan_out " if lora.fan_in_fan_out else ""
                raise self._error(
                    f"module '{lora.module}': the {layout}LoRA factors (A {shape_text(a_shape)}, B {shape_text(b_shape)}) make a {shape_text(want)} "
                    f"update but '{target}' is {shape_text(info.shape)} (is the adapter for a different model?)"
                )
            self._ops[target] = _Op("lora", self._result_dtype(info.dtype), tuple(info.shape), lora=lora, source=source)
            if target not in self.base.infos:
                added.append(target)
            if lora.bias is not None:
                self._plan_bias(lora)
        for target, key in self.adapter.full.items():
            shape = tuple(self.adapter.checkpoint.infos[key].shape)
            source = self._resolve(target)
            if source is None:
                raise self._error(
                    f"tensor '{key}' replaces '{target}', which the base does not have (is the adapter for a different model?)"
                )
            info = self._source_info(source)
            rows_only = (
                is_embedding_name(target) and len(shape) == len(info.shape) >= 1 and shape[1:] == tuple(info.shape[1:])
            )
            if shape != tuple(info.shape) and not rows_only:
                raise self._error(
                    f"tensor '{key}' has shape {shape_text(shape)} but the base's '{source[1]}' is {shape_text(info.shape)} (is the adapter for a different model?)"
                )
            dtype = info.dtype if source[0] == "base" else self.adapter.checkpoint.infos[key].dtype
            self._ops[target] = _Op("full", self._result_dtype(dtype), shape, key=key, source=source)
            if target not in self.base.infos:
                added.append(target)
        for target in added:
            if self._still_tied(target):
                del self._ops[target]
                log.info(
                    "%s: the adapter changes the tied head '%s' exactly like the embedding; it stays tied",
                    self.label,
                    target,
                )
                continue
            self._config["tie_word_embeddings"] = False
            for sub in ("text_config",):
                if isinstance(self._config.get(sub), dict) and "tie_word_embeddings" in self._config[sub]:
                    self._config[sub]["tie_word_embeddings"] = False
            log.info(
                "%s: the adapter changes the head '%s' apart from the tied embedding; the result unties them",
                self.label,
                target,
            )
        for target, op in self._ops.items():
            src = self.base.infos.get(target) or self._source_info(op.source)
            self.infos[target] = TensorInfo(
                target, op.dtype, op.shape, src.file, src.start, nbytes(op.dtype, numel(op.shape))
            )
        # with a merge dtype the whole adapted model is in it, as if it had been saved so
        self._cast: set[str] = set()
        for name, info in self.base.infos.items():
            if name not in self._ops and self._result_dtype(info.dtype) != info.dtype:
                self.infos[name] = TensorInfo(
                    name,
                    self.merge_dtype,
                    info.shape,
                    info.file,
                    info.start,
                    nbytes(self.merge_dtype, numel(info.shape)),
                )
                self._cast.add(name)
        self._check_vocabulary()

    def _result_dtype(self, base_code: str) -> str:
        """The dtype of a tensor the adapter changes: ``merge_dtype`` for float tensors, else the base's."""
        from ..io.dtypes import FLOAT_CODES

        return self.merge_dtype if self.merge_dtype and base_code in FLOAT_CODES else base_code

    def _plan_bias(self, lora: LoraModule) -> None:
        target = f"{lora.module}.bias"
        b_shape = tuple(self.adapter.checkpoint.infos[lora.bias].shape)
        info = self.base.infos.get(target)
        if info is None:
            raise self._error(f"module '{lora.module}' has a lora_B.bias but the base has no '{target}' to add it to")
        if tuple(info.shape) != b_shape:
            raise self._error(
                f"module '{lora.module}': lora_B.bias is {shape_text(b_shape)} but '{target}' is {shape_text(info.shape)}"
            )
        self._ops[target] = _Op(
            "bias", self._result_dtype(info.dtype), tuple(info.shape), lora=lora, source=("base", target)
        )

    def _still_tied(self, head: str) -> bool:
        """Whether the adapter changes a tied head exactly as it changes the embedding it is tied to."""
        import torch

        embedding = self._input_embedding()
        head_op, emb_op = self._ops.get(head), self._ops.get(embedding) if embedding else None
        if head_op is None or emb_op is None or head_op.kind != emb_op.kind or head_op.source != emb_op.source:
            return False
        tensor = self.adapter.checkpoint.tensor
        if head_op.kind == "full":
            return head_op.shape == emb_op.shape and torch.equal(tensor(head_op.key), tensor(emb_op.key))
        h, e = head_op.lora, emb_op.lora
        if h.scale != e.scale or h.kind == e.kind:
            return False
        # a linear head (B @ A) equals an embedding's (B_e @ A_e)^T when B = A_e^T and A = B_e^T
        lin, emb = (h, e) if h.kind == "linear" else (e, h)
        if lin.fan_in_fan_out:
            return False
        a, b, ea, eb = tensor(lin.a), tensor(lin.b), tensor(emb.a), tensor(emb.b)
        return a.shape == eb.T.shape and b.shape == ea.T.shape and torch.equal(a, eb.T) and torch.equal(b, ea.T)

    def _check_vocabulary(self) -> None:
        """An embedding whose rows the adapter changes: config.json follows it, and an untied head must match."""
        from ..architecture.layout import is_embedding_name, set_vocab_size

        embedding = self._input_embedding()
        if embedding is None or embedding not in self._ops:
            return
        rows = self.infos[embedding].shape[0]
        if rows == self.base.infos[embedding].shape[0]:
            return
        for name, info in self.infos.items():
            if (
                name != embedding
                and is_embedding_name(name)
                and len(info.shape) == 2
                and info.shape[0] != rows
                and info.shape[1:] == self.infos[embedding].shape[1:]
            ):
                raise self._error(
                    f"the adapter gives '{embedding}' {rows} rows but '{name}' keeps {info.shape[0]}; both must follow the vocabulary"
                )
        set_vocab_size(self._config, rows)

    # ------------------------------------------------------------------ Checkpoint interface
    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def changed(self) -> list[str]:
        """The tensors the adapter changes."""
        return list(self._ops)

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    def mapped(self, name: str) -> bool:
        return name not in self._ops and name not in self._cast and self.base.mapped(name)

    def view(self, name: str):
        if name in self._ops or name in self._cast:
            return None  # computed or cast: only torch can produce it
        return self.base.view(name)

    def prefetch(self, name: str) -> None:
        if name in self.base.infos:
            self.base.prefetch(name)

    def release(self, name: str) -> None:
        if name in self.base.infos:
            self.base.release(name)
        op = self._ops.get(name)
        if op is not None and op.source is not None and op.source[0] == "base" and op.source[1] != name:
            self.base.release(op.source[1])
        if op is not None:
            self.adapter.checkpoint.check_intact()  # its tensors are read, never released

    def check_intact(self, names: Iterable[str] | None = None) -> None:
        """``Checkpoint.check_intact`` of every file of the base and the adapter (a changed
        tensor may be computed from base tensors of other names)."""
        self.base.check_intact()
        self.adapter.checkpoint.check_intact()

    def _source(self, source: tuple[str, str]) -> torch.Tensor:
        where, name = source
        return (self.adapter.checkpoint if where == "adapter" else self.base).tensor(name)

    def delta(self, lora: LoraModule) -> torch.Tensor:
        """``scale * B @ A`` in float32, laid out like the base weight."""
        import torch

        dev = torch.device(self.device)
        a = self.adapter.checkpoint.tensor(lora.a).to(dev, torch.float32)
        b = self.adapter.checkpoint.tensor(lora.b).to(dev, torch.float32)
        d = b @ a
        if lora.kind == "embedding" or lora.fan_in_fan_out:
            d = d.T
        return d.mul_(lora.scale) if d.is_contiguous() else d * lora.scale

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        op = self._ops.get(name)
        if op is None:
            t = self.base.tensor(name)
            return t.to(torch_dtype(self.merge_dtype)) if name in self._cast else t
        dtype = torch_dtype(op.dtype)
        if op.kind == "full":
            t = self.adapter.checkpoint.tensor(op.key)
            return t if t.dtype == dtype else t.to(dtype)
        base = self._source(op.source)
        if op.kind == "bias":
            b = self.adapter.checkpoint.tensor(op.lora.bias).to(torch.float32)
            return (base.to(torch.float32) + op.lora.scale * b).to(dtype)
        out = base.to(self.device, torch.float32) + self.delta(op.lora)
        return out.to("cpu", dtype).contiguous()


def open_lora_checkpoint(
    base: Checkpoint, adapter_dir, label: str | None = None, device: str = "cpu", merge_dtype: str | None = None
) -> LoraCheckpoint:
    """``merge_dtype``: a config dtype name (bfloat16, float16, float32) the changed tensors are rounded to."""
    from ..io.dtypes import CONFIG_NAME_TO_CODE

    code = None
    if merge_dtype is not None:
        code = CONFIG_NAME_TO_CODE.get(str(merge_dtype).removeprefix("torch."))
        if code is None:
            raise PlanError(f"lora merge dtype '{merge_dtype}' is not one of {', '.join(CONFIG_NAME_TO_CODE)}")
    adapter = Adapter(adapter_dir, label=str(adapter_dir))
    return LoraCheckpoint(base, adapter, label=label, device=device, merge_dtype=code)
