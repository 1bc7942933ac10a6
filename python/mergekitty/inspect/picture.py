"""The picture of an inspection: heatmaps of layer x module kind, one panel per model (or pair of
models) and figure, one colour scale per figure so that the panels of a row compare; then a row
per config parameter. matplotlib is an optional extra (``mergekitty[plot]``)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import OutputError

if TYPE_CHECKING:
    from .figures import Inspection

__all__ = ["MISSING_MATPLOTLIB", "have_matplotlib", "render_png"]

MISSING_MATPLOTLIB = "writing a picture needs matplotlib: pip install 'mergekitty[plot]'"

# panel geometry, inches
ROW_IN = 0.17
KIND_IN = 0.62
# the most cells per panel that get their value written in them
ANNOTATE_CELLS = 160


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise OutputError(MISSING_MATPLOTLIB) from None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


class _Panel:
    """One heatmap: its title and the value of each (row, kind)."""

    def __init__(self, title: str, value: Callable[[str, str], float | None]) -> None:
        self.title = title
        self.value = value


class _FigureRow:
    """Panels that share a colour scale: the title of the colour bar, the colour map, and how the
    scale is centred (None: from the data's min to max; a number: symmetric around it)."""

    def __init__(self, label: str, cmap: str, panels: list[_Panel], centre: float | None = None) -> None:
        self.label = label
        self.cmap = cmap
        self.panels = panels
        self.centre = centre


def _figure_rows(inspection: Inspection) -> list[_FigureRow]:
    from .figures import FIGURES

    out = []

    def panels(figure: str) -> list[_Panel]:
        names = inspection.series_names(figure)
        result = []
        for k, name in enumerate(names):

            def value(row: str, kind: str, figure: str = figure, k: int = k) -> float | None:
                cell = inspection.cells.get((row, kind))
                return inspection.figure(figure, cell)[k] if cell is not None else None

            result.append(_Panel(f"{FIGURES[figure][0]}\n{name}", value))
        return result

    out.append(_FigureRow("|d| / |B|", "viridis", panels("relative_norm")))
    if inspection.pairs:
        out.append(_FigureRow("cosine", "RdBu_r", panels("cosine"), centre=0.0))
        out.append(_FigureRow("sign agreement", "PuOr_r", panels("sign_agreement"), centre=0.5))
    ties = panels("ties_keep")
    for p in ties:
        p.title = p.title.replace("\n", f" @{inspection.density:g}\n")
    out.append(_FigureRow("kept |d|^2 fraction", "magma", ties))
    by_name: dict[str, list[_Panel]] = {}
    for series in inspection.parameters:

        def param(row: str, kind: str, series: Any = series) -> float | None:
            v = series.values.get((row, kind))
            return v[2] if v is not None else None

        by_name.setdefault(series.name, []).append(_Panel(f"config: {series.label}", param))
    for name, group in by_name.items():
        out.append(_FigureRow(name, "cividis", group))
    return out


def _limits(values: Sequence[float], centre: float | None) -> tuple[float, float]:
    if not values:
        return (0.0, 1.0)
    lo, hi = min(values), max(values)
    if centre is not None:
        reach = max(abs(lo - centre), abs(hi - centre)) or 1e-6
        return (centre - reach, centre + reach)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        return (lo - 0.5, hi + 0.5) if hi == 0 else (lo * 0.9, hi * 1.1) if hi > 0 else (lo * 1.1, hi * 0.9)
    return (lo, hi)


def render_png(inspection: Inspection, dpi: int = 110) -> bytes:
    """The picture as PNG bytes; OutputError (one line) when matplotlib is not installed."""
    plt = _pyplot()
    import numpy as np

    rows, kinds = inspection.rows, inspection.kinds
    figure_rows = _figure_rows(inspection)
    ncols = max(len(fr.panels) for fr in figure_rows)
    panel_w = max(2.2, KIND_IN * len(kinds) + 0.9)
    panel_h = max(2.0, ROW_IN * len(rows) + 1.1)
    fig, axes = plt.subplots(
        len(figure_rows),
        ncols,
        figsize=(panel_w * ncols + 1.2, panel_h * len(figure_rows) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(
        f"mergekitty inspect: task vectors against {inspection.base} (TIES density {inspection.density:g})",
        fontsize=11,
    )
    step = max(1, math.ceil(len(rows) / 40))  # at most ~40 row labels
    annotate = len(rows) * len(kinds) <= ANNOTATE_CELLS
    for fr, axrow in zip(figure_rows, axes):
        grids = []
        for panel in fr.panels:
            grid = np.array(
                [[np.nan if (v := panel.value(r, k)) is None else v for k in kinds] for r in rows], dtype=float
            )
            grids.append(grid)
        finite = [float(v) for g in grids for v in g[np.isfinite(g)]]
        vmin, vmax = _limits(finite, fr.centre)
        cmap = plt.get_cmap(fr.cmap).with_extremes(bad="#e8e8e8")
        image = None
        for ax, panel, grid in zip(axrow, fr.panels, grids):
            image = ax.imshow(
                np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
            )
            ax.set_title(panel.title, fontsize=9)
            ax.set_xticks(range(len(kinds)), kinds, fontsize=8, rotation=30, ha="right")
            ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
            ax.set_ylabel("layer", fontsize=8)
            if annotate:
                _annotate(ax, grid, cmap, vmin, vmax)
        for ax in axrow[len(fr.panels) :]:
            ax.axis("off")
        if image is not None:
            bar = fig.colorbar(image, ax=list(axrow[: len(fr.panels)]), shrink=0.9, pad=0.02)
            bar.set_label(fr.label, fontsize=8)
            bar.ax.tick_params(labelsize=7)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    plt.close(fig)
    return out.getvalue()


def _annotate(ax: Any, grid: Any, cmap: Any, vmin: float, vmax: float) -> None:
    """Write each value in its cell, light on dark colours and dark on light ones."""
    import numpy as np

    span = (vmax - vmin) or 1.0
    for (r, k), v in np.ndenumerate(grid):
        if np.isfinite(v):
            red, green, blue, _ = cmap((v - vmin) / span)
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(k, r, f"{v:.2g}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
