"""Aligning vocabulary-sized tensors (embeddings, heads) to the output vocabulary.

Given each input's tensor (rows in that model's token order) and the ``VocabPlan``, every input
gets a ``[rows, ...]`` tensor in output token order, built with row gathers from its own rows
and the shared default rows. The merge method then sees inputs that line up row by row.

Everything here works on raw little-endian bytes (``RawTensor``) with numpy row gathers and the
native dtype casts, so a CPU merge aligns without torch; the torch path wraps the aligned bytes
in tensors. Default rows are means in float32, rounded to each input's dtype (round to nearest
even).
"""

from __future__ import annotations

import numpy as np

from ..errors import MergeError
from ..io.raw import RawTensor, from_f32, to_f32
from .build import MISSING, OWN_MEAN, VocabPlan

__all__ = ["RawTensor", "align_rows", "default_rows"]  # RawTensor: the type these take and give

# rows converted to float32 at a time when averaging a model's own rows
_MEAN_CHUNK_BYTES = 1 << 24


def default_rows(plan: VocabPlan, tensors: dict[int, RawTensor]) -> np.ndarray | None:
    """The default rows (float32 ``[slots, elems]``): means of (model, row) pairs, zeros when empty."""
    if not plan.defaults:
        return None
    elems = next(iter(tensors.values())).row_elems
    acc = np.zeros((len(plan.defaults), elems), dtype=np.float32)
    count = np.zeros(len(plan.defaults), dtype=np.float32)
    by_model: dict[int, tuple[list[int], list[int]]] = {}
    for slot, recipe in enumerate(plan.defaults):
        for m, row in recipe:
            slots, rows = by_model.setdefault(m, ([], []))
            slots.append(slot)
            rows.append(row)
    for m, (slots, rows) in by_model.items():
        t = tensors[m]
        np.add.at(acc, np.asarray(slots), to_f32(t.rows()[np.asarray(rows)], t.dtype))
        np.add.at(count, np.asarray(slots), np.float32(1.0))
    means: np.ndarray = acc / np.maximum(count, np.float32(1.0))[:, None]
    return means


def _mean_of_rows(rows: np.ndarray, dtype: str, elems: int) -> np.ndarray:
    """The float32 mean of byte rows of ``dtype``, converted a chunk at a time."""
    total = np.zeros(elems, dtype=np.float64)
    step = max(1, _MEAN_CHUNK_BYTES // max(rows.shape[1], 1))
    for i in range(0, rows.shape[0], step):
        total += to_f32(rows[i : i + step], dtype).sum(axis=0, dtype=np.float64)
    mean: np.ndarray = (total / max(rows.shape[0], 1)).astype(np.float32)[None, :]
    return mean


def align_rows(plan: VocabPlan, model: int, tensor: RawTensor, defaults: np.ndarray | None) -> RawTensor:
    """``tensor`` (model ``model``'s rows) laid out in the output vocabulary's order."""
    rmap = plan.row_maps[model]
    if rmap is None:
        return tensor
    index = np.ascontiguousarray(rmap)
    src = tensor.rows()
    out = np.empty((plan.rows, src.shape[1]), dtype=np.uint8)
    own = index >= 0
    out[own] = src[index[own]]
    missing = index == MISSING
    if missing.any():
        if defaults is None:
            raise MergeError("the vocabulary plan has missing rows but no default rows")
        out[missing] = from_f32(defaults[plan.default_slot[missing]], tensor.dtype)
    mean_rows = index == OWN_MEAN
    if mean_rows.any():
        held = np.asarray(plan.token_rows)
        if held.size:
            mean = _mean_of_rows(out[held], tensor.dtype, tensor.row_elems)
        else:
            mean = np.zeros((1, tensor.row_elems), dtype=np.float32)
        out[mean_rows] = from_f32(mean, tensor.dtype)
    return RawTensor(out.reshape(-1), tensor.dtype, (plan.rows, *tensor.shape[1:]))
