"""Aligning vocabulary-sized tensors (embeddings, heads) to the output vocabulary.

Given each input's tensor (rows in that model's token order) and the ``VocabPlan``, every input
gets a ``[rows, ...]`` tensor in output token order, built with index selects from its own rows
and the shared default rows. The merge method then sees inputs that line up row by row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .build import MISSING, OWN_MEAN, VocabPlan

if TYPE_CHECKING:
    import torch


def default_rows(plan: VocabPlan, tensors: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The default rows (float32, one per slot): means of (model, row) pairs, zeros when empty."""
    import torch

    if not plan.defaults:
        return None
    any_tensor = next(iter(tensors.values()))
    rest = tuple(any_tensor.shape[1:])
    acc = torch.zeros((len(plan.defaults), *rest), dtype=torch.float32, device=any_tensor.device)
    count = torch.zeros(len(plan.defaults), dtype=torch.float32, device=any_tensor.device)
    by_model: dict[int, tuple[list[int], list[int]]] = {}
    for slot, recipe in enumerate(plan.defaults):
        for m, row in recipe:
            slots, rows = by_model.setdefault(m, ([], []))
            slots.append(slot)
            rows.append(row)
    for m, (slots, rows) in by_model.items():
        t = tensors[m]
        idx = torch.tensor(slots, dtype=torch.long, device=t.device)
        acc.index_add_(0, idx, t[torch.tensor(rows, dtype=torch.long, device=t.device)].float())
        count.index_add_(0, idx, torch.ones(len(slots), dtype=torch.float32, device=t.device))
    shape = (len(plan.defaults),) + (1,) * len(rest)
    return acc / count.clamp(min=1.0).view(shape)


def align_rows(plan: VocabPlan, model: int, tensor: torch.Tensor, defaults: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` (model ``model``'s rows) laid out in the output vocabulary's order."""
    import torch

    rmap = plan.row_maps[model]
    if rmap is None:
        return tensor
    dev = tensor.device
    index = torch.from_numpy(np.ascontiguousarray(rmap)).to(dev)
    out = tensor.new_empty((plan.rows, *tensor.shape[1:]))
    own = index >= 0
    out[own] = tensor[index[own]]
    missing = index == MISSING
    if bool(missing.any()):
        assert defaults is not None, "the plan has default rows whenever a row is missing"
        slots = torch.from_numpy(plan.default_slot).to(dev)[missing]
        out[missing] = defaults[slots].to(tensor.dtype)
    mean_rows = index == OWN_MEAN
    if bool(mean_rows.any()):
        held = torch.from_numpy(plan.token_rows).to(dev)
        mean = (
            out[held].float().mean(0)
            if held.numel()
            else torch.zeros(tensor.shape[1:], dtype=torch.float32, device=dev)
        )
        out[mean_rows] = mean.to(tensor.dtype)
    return out
