"""The parameters a merge config gives each tensor, gathered per cell of the inspection grid.

The config is planned as ``mergekitty plan`` does (``api.plan_merge``: no weight is read), so a
gradient (``weight: [0, 0.5, 1]``), a filtered parameter or a per-slice value means here exactly
what it will mean in the merge. Every numeric parameter of every planned tensor is collected: the
method-level ones (``t``, ``lambda``...) and each model's (``weight``, ``density``...), defaults
included; a cell shows the mean of its tensors' values, and their range when they differ.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .figures import short_names
from .modules import Grid

__all__ = ["ParamSeries", "config_parameters", "plan_config"]


@dataclass(frozen=True)
class ParamSeries:
    """One parameter (of one model, or of the method) across the cells."""

    name: str
    model: str | None  # the model's label for a per-model parameter; None for a method-level one
    short: str | None  # the model's short name
    values: dict[tuple[str, str], tuple[float, float, float]]  # (row, kind) -> (min, max, mean)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.short})" if self.short is not None else self.name

    @property
    def varies(self) -> bool:
        """Whether the value is not the same everywhere (a gradient, a filter)."""
        return len({v for lo, hi, _ in self.values.values() for v in (lo, hi)}) > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "cells": [
                {"row": row, "kind": kind, "min": lo, "max": hi, "mean": mean}
                for (row, kind), (lo, hi, mean) in sorted(
                    self.values.items(), key=lambda rc: (Grid.row_order(rc[0][0]), rc[0][1])
                )
            ],
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _summary(values: list[float]) -> tuple[float, float, float]:
    """(min, max, mean); the value itself when they are all the same (no rounding in the mean)."""
    lo, hi = min(values), max(values)
    return (lo, hi, lo if lo == hi else math.fsum(values) / len(values))


def config_parameters(plan: Any, grid: Grid) -> list[ParamSeries]:
    """Every numeric parameter of the ``plan`` (an ``api.plan_merge`` MergePlan), per cell."""
    labels = [m.label for m in plan.models]
    shorts = dict(zip(labels, short_names(labels)))
    found: dict[tuple[str, str | None], dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for job in plan.jobs:
        place = grid.place(job.out_name)
        cell = (place.row, place.kind)
        for name, value in job.params.items():
            v = _number(value)
            if v is not None:
                found[(name, None)][cell].append(v)
        for source, params in zip(job.sources, job.model_params):
            label = plan.models[source.model].label
            for name, value in params.items():
                v = _number(value)
                if v is not None:
                    found[(name, label)][cell].append(v)
    out = []
    for (name, label), cells in found.items():
        values = {cell: _summary(vs) for cell, vs in cells.items()}
        out.append(ParamSeries(name, label, shorts.get(label) if label is not None else None, values))
    # method-level parameters first, then each model's in config order
    order = {label: i for i, label in enumerate(labels)}
    out.sort(key=lambda s: (s.model is not None, order.get(s.model, -1) if s.model else -1, s.name))
    return out


def plan_config(config_file: str, strict: bool = False, cache_dir: str | None = None) -> Any:
    """Load and plan the merge config ``config_file`` (every error it would give a merge)."""
    from ..api import MergeOptions, plan_merge
    from ..config import load_config_file

    config = load_config_file(config_file)
    return plan_merge(config, None, MergeOptions(strict=strict, transformers_cache=cache_dir, quiet=True))
