"""Outputs made of whole tensors, copied or computed, streamed into safetensors shards: the
writer of the commands that do not merge tensor by tensor (mergekitty moe, tokensurgeon,
fill-missing).

Every output tensor is either a copy of one input tensor (for an MoE: attention, norms,
embeddings from the base; each expert's MLP projections from its source model, optionally
scaled or noised) or a computed array (router weights, transplanted embeddings). Input tensors are read one at a time from the
memory maps and written through the native ``ShardWriter``; a copy whose dtype already
matches is written straight from the map, any other is computed in numpy (float32, then the
native cast to the output dtype, round to nearest even): ``x * residual_scale``, or with
noise ``(x + z * noise_scale) * residual_scale``, where ``z[i]`` is draw ``i`` of
``draws.normal_array`` on stream ``"moe.noise:" + output tensor name`` with ``--random-seed``
(``i`` the flat element index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MergeError, MergekittyError
from ..moe.draws import normal_array
from ..sizes import numel
from .dtypes import FLOAT_CODES, NATIVE_FLOAT_CODES, nbytes
from .raw import RawTensor, from_f32, read_raw, to_f32

NOISE_STREAM = "moe.noise:"


@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors code of the output
    shape: tuple[int, ...]
    model: Any = None  # inputs.SourceModel to copy from
    source: str | None = None  # tensor name in that model
    scale: float | None = None  # residual_scale
    noise: float | None = None  # noise_scale
    value: np.ndarray | None = None  # a computed float32 array (router weights)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, numel(self.shape))


def copy_of(name: str, model, source: str, out_code: str, scale=None, noise=None) -> OutTensor:
    info = model.checkpoint.infos[source]
    code = out_code if info.dtype in FLOAT_CODES else info.dtype  # integer buffers keep their type
    return OutTensor(name, code, tuple(info.shape), model, source, scale, noise)


def computed(name: str, value: np.ndarray, out_code: str) -> OutTensor:
    return OutTensor(name, out_code, tuple(value.shape), value=np.ascontiguousarray(value, dtype=np.float32))


def _flat(raw: RawTensor) -> np.ndarray:
    """The bytes of ``raw`` as one ``[1, nbytes]`` row (also for 0-d tensors)."""
    return np.frombuffer(memoryview(raw.data), dtype=np.uint8).reshape(1, -1)


def _bytes_of(t: OutTensor, seed: int) -> Any:
    """The bytes of ``t`` (a zero-copy map view for a plain copy in the input's dtype)."""
    if t.value is not None:
        return from_f32(t.value.reshape(1, -1), t.dtype).reshape(-1)
    assert t.model is not None and t.source is not None, "a tensor is computed or copied"
    raw = read_raw(t.model.checkpoint, t.source)
    if t.scale is None and not t.noise:
        if raw.dtype == t.dtype:
            return raw.data
        if raw.dtype in NATIVE_FLOAT_CODES and t.dtype in NATIVE_FLOAT_CODES:
            return _cast(raw, t.dtype)
    x = to_f32(_flat(raw), raw.dtype).reshape(-1)
    if t.noise:
        x = x + normal_array(seed, NOISE_STREAM + t.name, x.size) * np.float32(t.noise)
    if t.scale is not None:
        x = x * np.float32(t.scale)
    return from_f32(x.reshape(1, -1), t.dtype).reshape(-1)


def _cast(raw: RawTensor, code: str) -> np.ndarray:
    """``raw`` in the float dtype ``code`` (round to nearest even), without going through float32."""
    from .. import _native

    src = _flat(raw).reshape(-1)
    out = np.empty(nbytes(code, numel(raw.shape)), dtype=np.uint8)
    _native.convert(src.data, raw.dtype, out.data, code, 1)
    return out


def write_all(
    tensors: list[OutTensor], writer, seed: int, on_tensor: Callable[[OutTensor], None] | None = None
) -> None:
    """Write every tensor of ``tensors`` in order through ``writer`` (a ShardWriter)."""
    for i, t in enumerate(tensors):
        for ahead in tensors[i + 1 : i + 3]:
            if ahead.model is not None:
                ahead.model.checkpoint.prefetch(ahead.source)
        try:
            data = _bytes_of(t, seed)
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
