"""What ``mergekitty inspect`` reports, and how each figure is defined.

For a base ``B`` and models ``X_1..X_N``, the task vector of model ``i`` in a tensor is
``d_i = X_i - B`` (computed in float32, as the merge methods do). For each cell of the grid (a
layer, or the weights before/after the layer stack, by module kind: ``modules.py``) the figures
are ratios of sums taken over every tensor of the cell, never averages of per-tensor ratios:

relative norm (per model)
    ``|d_i| / |B|``: how far the model moved from the base, relative to the base's size.
cosine (per pair)
    ``d_i . d_j / (|d_i| |d_j|)``: 1 when two models moved the same way, 0 when their changes are
    unrelated, negative when they undo each other. Linear and task-arithmetic merges of models
    with a low cosine shrink (the changes average out).
sign agreement (per pair)
    Among the elements where both ``d_i`` and ``d_j`` are nonzero, the fraction where their signs
    agree. 0.5 is what unrelated changes give; TIES' sign election drops the minority side of each
    element, so a low agreement means TIES discards much of each model.
TIES keep (per model)
    The fraction of ``|d_i|^2`` held by the elements TIES keeps at ``--density`` (the
    ``max(1, floor(density * n))`` largest magnitudes of each tensor, ties at the threshold kept),
    summed over the cell's tensors: ``sum kept d^2 / sum d^2``. Near 1: the change is concentrated
    in a few large elements and trimming loses little; near ``density``: it is spread evenly.
DARE spread (per model)
    DARE keeps each element with probability ``p = density`` and divides the kept ones by ``p``;
    the rescaled vector's squared norm is ``|d_i|^2 / p`` on average for every tensor, so the
    expected norm ratio is always ``sqrt(1/p)`` and says nothing about the model. What differs is
    how much one random mask departs from that average: the coefficient of variation of the
    rescaled squared norm, ``sqrt((1 - p) / p) * sqrt(sum d^4) / sum d^2`` (the sums over the
    cell: masks are independent across elements). Near 0: DARE is safe, the change is spread over
    many elements; large (above ~0.1): a few elements carry the change and a mask may drop them.

Elements where ``d_i`` is NaN or infinite count as 0 (and are reported); a model whose norm is 0 in
a cell has no cosine or keep fraction there (``None``).

The raw sums come from one native pass per tensor (``_native.task_vector_stats``); this module
only adds them up and divides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .modules import KINDS, Grid

__all__ = ["CellSums", "Inspection", "pairs"]

FORMAT = "mergekitty-inspect/1"


def pairs(n: int) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, in the order the native kernel gives pair figures."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


@dataclass
class CellSums:
    """Raw sums over the tensors of one cell (per model, and per pair of models)."""

    models: int
    tensors: int = 0
    numel: int = 0
    base_sumsq: float = 0.0
    sumsq: list[float] = field(default_factory=list)
    sum4: list[float] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    ties_sumsq: list[float] = field(default_factory=list)
    dot: list[float] = field(default_factory=list)
    both_nonzero: list[int] = field(default_factory=list)
    sign_agree: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        k, p = self.models, len(pairs(self.models))
        for name, size, zero in (
            ("sumsq", k, 0.0),
            ("sum4", k, 0.0),
            ("nonfinite", k, 0),
            ("ties_sumsq", k, 0.0),
            ("dot", p, 0.0),
            ("both_nonzero", p, 0),
            ("sign_agree", p, 0),
        ):
            if not getattr(self, name):
                setattr(self, name, [zero] * size)

    def add_tensor(self, figures: Mapping[str, Any]) -> None:
        """Add one tensor's figures (the dict ``_native.task_vector_stats`` returns)."""
        self.tensors += 1
        self.numel += int(figures["numel"])
        self.base_sumsq += float(figures["base_sumsq"])
        for name in ("sumsq", "sum4", "nonfinite", "ties_sumsq", "dot", "both_nonzero", "sign_agree"):
            mine = getattr(self, name)
            for i, v in enumerate(figures[name]):
                mine[i] += v

    def add(self, other: CellSums) -> None:
        self.tensors += other.tensors
        self.numel += other.numel
        self.base_sumsq += other.base_sumsq
        for name in ("sumsq", "sum4", "nonfinite", "ties_sumsq", "dot", "both_nonzero", "sign_agree"):
            mine = getattr(self, name)
            for i, v in enumerate(getattr(other, name)):
                mine[i] += v

    # ------------------------------------------------------------------- the figures
    def relative_norm(self, i: int) -> float | None:
        return math.sqrt(self.sumsq[i] / self.base_sumsq) if self.base_sumsq > 0 else None

    def cosine(self, p: int) -> float | None:
        i, j = pairs(self.models)[p]
        denom = math.sqrt(self.sumsq[i]) * math.sqrt(self.sumsq[j])
        return self.dot[p] / denom if denom > 0 else None

    def sign_agreement(self, p: int) -> float | None:
        return self.sign_agree[p] / self.both_nonzero[p] if self.both_nonzero[p] > 0 else None

    def ties_keep(self, i: int) -> float | None:
        return self.ties_sumsq[i] / self.sumsq[i] if self.sumsq[i] > 0 else None

    def dare_spread(self, i: int, density: float) -> float | None:
        if self.sumsq[i] <= 0 or not 0 < density <= 1:
            return None
        return math.sqrt((1 - density) / density) * math.sqrt(self.sum4[i]) / self.sumsq[i]


# figure name -> (title, per model or per pair)
FIGURES = {
    "relative_norm": ("relative norm |d|/|B|", "model"),
    "cosine": ("cosine of task vectors", "pair"),
    "sign_agreement": ("sign agreement", "pair"),
    "ties_keep": ("TIES keep fraction", "model"),
    "dare_spread": ("DARE spread", "model"),
}


@dataclass
class Inspection:
    """The figures of one run: per (row, kind) cell, and the config's parameters when given."""

    base: str  # the base model's label
    models: tuple[str, ...]  # the other models' labels
    density: float
    cells: dict[tuple[str, str], CellSums]
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it was left out
    parameters: list[Any] = field(default_factory=list)  # config_params.ParamSeries

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return pairs(len(self.models))

    @property
    def names(self) -> tuple[str, ...]:
        """Short names of the models (the last part of each label), unique."""
        return short_names(self.models)

    @property
    def pair_names(self) -> list[str]:
        names = self.names
        return [f"{names[i]}~{names[j]}" for i, j in self.pairs]

    @property
    def rows(self) -> list[str]:
        rows = {r for r, _ in self.cells} | {r for s in self.parameters for r, _ in s.values}
        return sorted(rows, key=Grid.row_order)

    @property
    def kinds(self) -> list[str]:
        present = {k for _, k in self.cells} | {k for s in self.parameters for _, k in s.values}
        return [k for k in KINDS if k in present]

    def total(self, kinds: Iterable[str] | None = None) -> CellSums:
        """The sums over every cell (of ``kinds``, when given)."""
        wanted = set(kinds) if kinds is not None else None
        out = CellSums(len(self.models))
        for (_, kind), cell in self.cells.items():
            if wanted is None or kind in wanted:
                out.add(cell)
        return out

    def figure(self, name: str, cell: CellSums) -> list[float | None]:
        """Figure ``name`` of ``cell``: one value per model or per pair (see ``FIGURES``)."""
        if name == "relative_norm":
            return [cell.relative_norm(i) for i in range(len(self.models))]
        if name == "ties_keep":
            return [cell.ties_keep(i) for i in range(len(self.models))]
        if name == "dare_spread":
            return [cell.dare_spread(i, self.density) for i in range(len(self.models))]
        if name == "cosine":
            return [cell.cosine(p) for p in range(len(self.pairs))]
        if name == "sign_agreement":
            return [cell.sign_agreement(p) for p in range(len(self.pairs))]
        raise KeyError(name)

    def series_names(self, name: str) -> list[str]:
        """The label of each value of figure ``name``: the models' or the pairs' short names."""
        return list(self.names) if FIGURES[name][1] == "model" else self.pair_names

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain JSON values (None where a figure is undefined)."""
        figures = list(FIGURES)
        cells = []
        for (row, kind), cell in sorted(self.cells.items(), key=lambda rc: (Grid.row_order(rc[0][0]), rc[0][1])):
            entry: dict[str, Any] = {"row": row, "kind": kind, "tensors": cell.tensors, "numel": cell.numel}
            entry.update({f: _clean(self.figure(f, cell)) for f in figures})
            if any(cell.nonfinite):
                entry["nonfinite"] = list(cell.nonfinite)
            cells.append(entry)
        totals = {k: {f: _clean(self.figure(f, self.total([k]))) for f in figures} for k in self.kinds}
        totals["all"] = {f: _clean(self.figure(f, self.total())) for f in figures}
        return {
            "format": FORMAT,
            "base": self.base,
            "models": list(self.models),
            "names": list(self.names),
            "pairs": [[i, j] for i, j in self.pairs],
            "density": self.density,
            "rows": self.rows,
            "kinds": self.kinds,
            "cells": cells,
            "totals": totals,
            "skipped": dict(self.skipped),
            "parameters": [s.to_dict() for s in self.parameters],
        }


def _clean(values: list[float | None]) -> list[float | None]:
    return [v if v is not None and math.isfinite(v) else None for v in values]


def short_names(labels: Iterable[str]) -> tuple[str, ...]:
    """The last path part of each label (``org/model`` -> ``model``), or the whole label where
    two would be the same."""
    labels = list(labels)
    short = [label.rstrip("/").rsplit("/", 1)[-1] or label for label in labels]
    return tuple(s if short.count(s) == 1 else label for s, label in zip(short, labels))
