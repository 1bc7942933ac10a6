"""Where a tensor sits in the inspection grid: its row (the layer it belongs to, or the weights
before or after the layer stack) and the kind of module it is part of.

Rows follow the model's layout (``architecture.infer_layout``): ``"pre"`` for the weights before
the layer stack (embeddings, a vision tower), ``"0"``, ``"1"``... for the layers, ``"post"`` for
the weights after it (the final norm, the head). Kinds are read from the tensor name, whatever
the architecture's spelling (``self_attn``, ``attention``, ``attn``; ``mlp``, ``ffn``,
``feed_forward``, MoE experts...); what matches none of them is ``"other"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..architecture.layout import ModelLayout, is_embedding_name

__all__ = ["KINDS", "PRE", "POST", "Placement", "Grid", "kind_of"]

# in the order tables and pictures show them
KINDS = ("attention", "mlp", "norm", "embedding", "other")
PRE, POST = "pre", "post"

_NORM = re.compile(r"(^|[._])(\w*norm\w*|ln_?\w*|ln)([._]|$)")
_ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "query", "key", "value")
_MLP_WORDS = (
    "mlp", "ffn", "feed_forward", "feedforward", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc",
    "dense_h_to_4h", "dense_4h_to_h", "experts", "moe", "gate_up_proj", "w1", "w2", "w3",
)  # fmt: skip


def kind_of(name: str) -> str:
    """The module kind of tensor ``name``: one of ``KINDS``. A norm inside attention (``q_norm``)
    is a norm; a router (``mlp.gate``) is part of the MLP."""
    low = name.lower()
    if is_embedding_name(low):
        return "embedding"
    if _NORM.search(low):
        return "norm"
    words = set(re.split(r"[._]", low))
    if any(w in words for w in _ATTENTION_WORDS) or any(w in low for w in ("attn", "attention")):
        return "attention"
    if any(w in words for w in _MLP_WORDS) or any(w in low for w in ("mlp", "feed_forward", "expert")):
        return "mlp"
    return "other"


@dataclass(frozen=True)
class Placement:
    row: str  # "pre", a layer index ("0", "1"...), or "post"
    kind: str  # one of KINDS


class Grid:
    """Places the tensors of one model (the base's layout) in rows and kinds."""

    def __init__(self, layout: ModelLayout) -> None:
        self.layout = layout
        self._pre = set(layout.pre)
        self._layer = re.compile(re.escape(layout.prefix) + r"\.(\d+)\.") if layout.prefix else None

    def place(self, name: str) -> Placement:
        if self._layer is not None:
            m = self._layer.match(name)
            if m:
                return Placement(m[1], kind_of(name[m.end() :]))
        return Placement(PRE if name in self._pre else POST, kind_of(name))

    @staticmethod
    def row_order(row: str) -> tuple[int, int]:
        """Sort key of a row: the weights before the stack, the layers in order, those after it."""
        if row == PRE:
            return (0, 0)
        if row == POST:
            return (2, 0)
        return (1, int(row))
