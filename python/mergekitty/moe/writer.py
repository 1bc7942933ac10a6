"""The output tensors of an MoE build, and streaming them into safetensors shards.

Every output tensor is either a copy of one input tensor (attention, norms, embeddings
from the base; each expert's MLP projections from its source model, optionally scaled or
noised) or a computed router weight. Input tensors are read one at a time from the
memory maps and written through the native ``ShardWriter``; a copy whose dtype already
matches is written straight from the map without touching torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MergeError, MergekittyError
from ..io.dtypes import FLOAT_CODES

if TYPE_CHECKING:
    import torch


@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors code of the output
    shape: tuple[int, ...]
    model: Any = None  # inputs.SourceModel to copy from
    source: str | None = None  # tensor name in that model
    scale: float | None = None  # residual_scale
    noise: float | None = None  # noise_scale
    value: Any = None  # a computed tensor (router weights)

    @property
    def nbytes(self) -> int:
        from ..io.dtypes import nbytes
        from ..sizes import numel

        return nbytes(self.dtype, numel(self.shape))


def copy_of(name: str, model, source: str, out_code: str, scale=None, noise=None) -> OutTensor:
    info = model.checkpoint.infos[source]
    code = out_code if info.dtype in FLOAT_CODES else info.dtype  # integer buffers keep their type
    return OutTensor(name, code, tuple(info.shape), model, source, scale, noise)


def computed(name: str, value: torch.Tensor, out_code: str) -> OutTensor:
    return OutTensor(name, out_code, tuple(value.shape), value=value)


def _bytes_of(t: OutTensor, generator) -> Any:
    """The bytes of ``t`` (a zero-copy map view for a plain copy in the input's dtype)."""
    if t.value is None:
        info = t.model.checkpoint.infos[t.source]
        if t.scale is None and not t.noise and info.dtype == t.dtype:
            view = t.model.checkpoint.view(t.source)
            if view is not None:
                return view
    import torch

    from ..io.dtypes import torch_dtype
    from ..ops.reduce import bytes_view

    out_dtype = torch_dtype(t.dtype)
    x = t.value if t.value is not None else t.model.checkpoint.tensor(t.source)
    if t.scale is not None or t.noise:
        x = x.to(torch.float32)
        if t.noise:
            x = x + torch.randn(x.shape, generator=generator) * t.noise
        if t.scale is not None:
            x = x * t.scale
    return bytes_view(x.to(out_dtype).contiguous())


def write_all(
    tensors: list[OutTensor], writer, seed: int, on_tensor: Callable[[OutTensor], None] | None = None
) -> None:
    """Write every tensor of ``tensors`` in order through ``writer`` (a ShardWriter)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for i, t in enumerate(tensors):
        for ahead in tensors[i + 1 : i + 3]:
            if ahead.model is not None:
                ahead.model.checkpoint.prefetch(ahead.source)
        try:
            data = _bytes_of(t, generator)
            writer.write(t.name, data)
        except MergekittyError:
            raise
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            where = f" (from '{t.source}' of {t.model.label})" if t.model is not None else ""
            raise MergeError(f"tensor '{t.name}'{where}: {exc}") from exc
        del data
        if t.model is not None:
            t.model.checkpoint.release(t.source)
        if on_tensor is not None:
            on_tensor(t)
