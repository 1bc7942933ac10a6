"""The HTML report of an inspection: one self-contained file (inline style, the picture embedded
as a base64 PNG when matplotlib is installed, else a note saying how to get it), with a table
per figure (layer x module kind x model), the totals, the config's parameters, and what each
figure means."""

from __future__ import annotations

import base64
import html
import math
from typing import TYPE_CHECKING

from .figures import FIGURES
from .table import fmt, param_text

if TYPE_CHECKING:
    from .figures import Inspection

__all__ = ["render_html"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td.row { font-weight: bold; background: #f9f9f9; }
.note { color: #8a5a00; } dt { font-weight: bold; margin-top: 0.6em; } dd { margin-left: 1.5em; }
img { max-width: 100%; }
"""

DEFINITIONS = {
    "relative_norm": "|d_i| / |B|: how far model i moved from the base, relative to the base's size "
    "(d_i = X_i - B, over every tensor of the cell).",
    "cosine": "d_i . d_j / (|d_i| |d_j|): 1 when two models moved the same way, 0 when their changes are "
    "unrelated, negative when they undo each other.",
    "sign_agreement": "Among the elements where both task vectors are nonzero, the fraction where their signs "
    "agree (0.5 for unrelated changes). TIES' sign election drops the minority side of each element.",
    "ties_keep": "The fraction of |d_i|^2 held by the elements TIES keeps at the density (the "
    "max(1, floor(density n)) largest magnitudes of each tensor). Near 1: trimming loses little.",
    "dare_spread": "How much one random DARE mask departs from the average: the coefficient of variation of "
    "the rescaled vector's squared norm, sqrt((1-p)/p) sqrt(sum d^4) / sum d^2 (its expected norm ratio is "
    "always sqrt(1/p)). Large values (above ~0.1) mean a few elements carry the change.",
}


def _shade(value: float | None, lo: float, hi: float) -> str:
    """A light background for a value on [lo, hi] (stronger for larger values)."""
    if value is None or not math.isfinite(value) or hi <= lo:
        return ""
    t = min(1.0, max(0.0, (value - lo) / (hi - lo)))
    return f' style="background: rgba(70, 130, 180, {0.08 + 0.5 * t:.2f})"'


def _figure_table(inspection: Inspection, figure: str) -> str:
    names = inspection.series_names(figure)
    kinds, rows = inspection.kinds, inspection.rows
    values = {
        (row, kind): inspection.figure(figure, cell)
        for row in rows
        for kind in kinds
        if (cell := inspection.cells.get((row, kind))) is not None
    }
    finite = [v for vs in values.values() for v in vs if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    head1 = "".join(f'<th colspan="{len(names)}">{html.escape(k)}</th>' for k in kinds)
    head2 = "".join(f"<th>{html.escape(n)}</th>" for _ in kinds for n in names)
    body = []
    for row in rows:
        cells: list[str] = []
        for kind in kinds:
            vs = values.get((row, kind))
            if vs is None:
                cells.extend("<td></td>" for _ in names)
            else:
                cells.extend(f"<td{_shade(v, lo, hi)}>{fmt(v)}</td>" for v in vs)
        body.append(f'<tr><td class="row">{html.escape(row)}</td>{"".join(cells)}</tr>')
    return f'<table><tr><th rowspan="2">layer</th>{head1}</tr><tr>{head2}</tr>' + "".join(body) + "</table>"


def _totals(inspection: Inspection) -> str:
    total = inspection.total()
    d = inspection.density
    rows = [
        f"<tr><td class='row'>{html.escape(n)}</td><td>{fmt(total.relative_norm(i))}</td>"
        f"<td>{fmt(total.ties_keep(i))}</td><td>{fmt(total.dare_spread(i, d))}</td></tr>"
        for i, n in enumerate(inspection.names)
    ]
    out = (
        "<table><tr><th>model</th><th>relative norm</th>"
        f"<th>TIES keep @{d:g}</th><th>DARE spread @{d:g}</th></tr>" + "".join(rows) + "</table>"
    )
    if inspection.pairs:
        prow = [
            f"<tr><td class='row'>{html.escape(n)}</td><td>{fmt(total.cosine(p))}</td>"
            f"<td>{fmt(total.sign_agreement(p))}</td></tr>"
            for p, n in enumerate(inspection.pair_names)
        ]
        out += "<table><tr><th>pair</th><th>cosine</th><th>sign agreement</th></tr>" + "".join(prow) + "</table>"
    return out


def _parameters(inspection: Inspection) -> str:
    series, kinds = inspection.parameters, inspection.kinds
    head = "".join(f"<th>{html.escape(s.label)}</th>" for s in series)
    body = "".join(
        f"<tr><td class='row'>{html.escape(row)}</td>"
        + "".join(f"<td>{html.escape(param_text(s, row, kinds))}</td>" for s in series)
        + "</tr>"
        for row in inspection.rows
    )
    return f"<table><tr><th>layer</th>{head}</tr>{body}</table>"


def render_html(inspection: Inspection, png: bytes | None, note: str | None = None) -> str:
    """The report; ``png``: the picture to embed (None: ``note`` says why there is none)."""
    models = ", ".join(html.escape(m) for m in inspection.models)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mergekitty inspect: {html.escape(inspection.base)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>mergekitty inspect</h1>",
        f"<p>base: <b>{html.escape(inspection.base)}</b><br>models: {models}<br>"
        f"TIES/DARE density: {inspection.density:g}</p>",
    ]
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<img alt="heatmaps of the figures per layer and module kind" src="data:image/png;base64,{data}">'
        )
    elif note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append("<h2>whole models</h2>" + _totals(inspection))
    for figure, (title, per) in FIGURES.items():
        if per == "pair" and not inspection.pairs:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>" + _figure_table(inspection, figure))
    if inspection.parameters:
        parts.append("<h2>config parameters</h2>" + _parameters(inspection))
    if inspection.skipped:
        items = "".join(
            f"<li><code>{html.escape(n)}</code>: {html.escape(why)}</li>" for n, why in inspection.skipped.items()
        )
        parts.append(f"<h2>tensors left out</h2><ul>{items}</ul>")
    defs = "".join(
        f"<dt>{html.escape(FIGURES[f][0])}</dt><dd>{html.escape(text)}</dd>" for f, text in DEFINITIONS.items()
    )
    parts.append(f"<h2>what the figures mean</h2><dl>{defs}</dl></body></html>")
    return "\n".join(parts) + "\n"
