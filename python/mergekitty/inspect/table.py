"""The terminal tables of an inspection (rich): one row per layer, a column per module kind and
model (or pair of models), then the totals, and the config's parameters when one was given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console

    from .config_params import ParamSeries
    from .figures import Inspection

__all__ = ["fmt", "print_tables", "param_text"]

# the kinds' column headers, short enough for a table of several models
SHORT_KIND = {"attention": "attn", "mlp": "mlp", "norm": "norm", "embedding": "embed", "other": "other"}


def fmt(value: float | None) -> str:
    """A figure with three significant digits; "-" where it is undefined."""
    if value is None:
        return "-"
    return f"{value:.3g}"


def _grid_table(inspection: Inspection, figure: str, title: str) -> Table:
    names = inspection.series_names(figure)
    kinds = inspection.kinds
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("layer", justify="right")
    for kind in kinds:
        for name in names:
            table.add_column(f"{SHORT_KIND[kind]}\n{escape(name)}", justify="right")
    for row in inspection.rows:
        values: list[str] = []
        for kind in kinds:
            cell = inspection.cells.get((row, kind))
            figs = inspection.figure(figure, cell) if cell is not None else [None] * len(names)
            values.extend(fmt(v) if cell is not None else "" for v in figs)
        table.add_row(row, *values)
    return table


def _totals_tables(inspection: Inspection) -> list[Table]:
    d = inspection.density
    table = Table(title="whole models", title_justify="left", header_style="bold")
    table.add_column("model", justify="left")
    table.add_column("relative norm", justify="right")
    table.add_column(f"TIES keep @{d:g}", justify="right")
    table.add_column(f"DARE spread @{d:g}", justify="right")
    total = inspection.total()
    for i, name in enumerate(inspection.names):
        table.add_row(escape(name), fmt(total.relative_norm(i)), fmt(total.ties_keep(i)), fmt(total.dare_spread(i, d)))
    if not inspection.pairs:
        return [table]
    pair_table = Table(title="pairs, whole models", title_justify="left", header_style="bold")
    pair_table.add_column("pair", justify="left")
    pair_table.add_column("cosine", justify="right")
    pair_table.add_column("sign agreement", justify="right")
    for p, name in enumerate(inspection.pair_names):
        pair_table.add_row(escape(name), fmt(total.cosine(p)), fmt(total.sign_agreement(p)))
    return [table, pair_table]


def param_text(series: ParamSeries, row: str, kinds: list[str]) -> str:
    """The value of ``series`` in ``row``: one number (or range) when every kind has the same,
    else each kind's."""
    shown = []
    for kind in kinds:
        v = series.values.get((row, kind))
        if v is not None:
            lo, hi, _ = v
            shown.append((kind, fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}..{fmt(hi)}"))
    if not shown:
        return ""
    if len({text for _, text in shown}) == 1:
        return shown[0][1]
    return " ".join(f"{SHORT_KIND[k]}={text}" for k, text in shown)


def _params_table(inspection: Inspection) -> Table:
    table = Table(title="config parameters", title_justify="left", header_style="bold")
    table.add_column("layer", justify="right")
    series = inspection.parameters
    for s in series:
        table.add_column(escape(s.label), justify="right")
    kinds = inspection.kinds
    for row in inspection.rows:
        table.add_row(row, *(param_text(s, row, kinds) for s in series))
    return table


def print_tables(inspection: Inspection, console: Console) -> None:
    base = f"base {escape(inspection.base)}"
    console.print(_grid_table(inspection, "relative_norm", f"relative norm |d|/|B| of each task vector ({base})"))
    if inspection.pairs:
        console.print(_grid_table(inspection, "cosine", "cosine of the task vectors of each pair"))
    for table in _totals_tables(inspection):
        console.print(table)
    if inspection.parameters:
        console.print(_params_table(inspection))
