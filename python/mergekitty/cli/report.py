"""Printing a MergePlan for ``mergekitty plan`` and ``--dry-run``."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..sizes import format_size


def print_plan(plan, console: Console) -> None:
    console.print(f"[bold]method:[/] {plan.method.name}")
    for i, m in enumerate(plan.models):
        tags = [t for t, on in (("donor", i == plan.donor), ("base", i == plan.base)) if on]
        suffix = f" ({', '.join(tags)})" if tags else ""
        console.print(f"[bold]model {i}:[/] {escape(m.label)}, {m.layout.num_layers} layers{suffix}")
    if plan.layer_map:
        table = Table(title="layer map", show_lines=False)
        table.add_column("output layer", justify="right")
        table.add_column("sources (model: layer)")
        for out_layer, sources in plan.layer_map:
            table.add_row(str(out_layer), escape(", ".join(f"{label}: {layer}" for label, layer in sources)))
        console.print(table)
    console.print(f"[bold]tensors:[/] {len(plan.jobs)}")
    console.print(f"[bold]input read:[/] {format_size(plan.input_bytes)}")
    console.print(f"[bold]output size:[/] {format_size(plan.output_bytes)}")
    console.print(f"[bold]peak memory estimate:[/] {format_size(plan.peak_memory_estimate())}")
