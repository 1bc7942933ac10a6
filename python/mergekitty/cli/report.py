"""Printing a MergePlan for ``mergekitty plan`` and ``--dry-run``, and what a merge says as it
runs with ``-v``/``-vv`` (``MergeNarration``)."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..sizes import format_size

_LAYER_INDEX = re.compile(r"\.\d+\.")


def print_plan(plan, console: Console) -> None:
    console.print(f"[bold]method:[/] {plan.method.name}")
    for i, m in enumerate(plan.models):
        tags = [t for t, on in (("donor", i == plan.donor), ("base", i == plan.base)) if on]
        suffix = f" ({', '.join(tags)})" if tags else ""
        console.print(f"[bold]model {i}:[/] {escape(m.label)}, {m.num_layers} layers{suffix}")
    if plan.layer_map:
        table = Table(title="layer map", show_lines=False)
        table.add_column("output layer", justify="right")
        table.add_column("sources (model: layer)")
        for out_layer, sources in plan.layer_map:
            table.add_row(str(out_layer), escape(", ".join(f"{label}: {layer}" for label, layer in sources)))
        console.print(table)
    if plan.vocab is not None:
        print_vocabulary(plan, console)
    console.print(f"[bold]tensors:[/] {len(plan.jobs)}")
    for ex in plan.excluded:  # input tensors no output tensor reads, each with the planner's reason
        console.print(
            f"  left out of {escape(plan.models[ex.model].label)}: {len(ex.tensors)} tensor(s), {escape(ex.reason)}"
        )
    console.print(f"[bold]input read:[/] {format_size(plan.input_bytes)}")
    console.print(f"[bold]output size:[/] {format_size(plan.output_bytes)}")
    memory = plan.memory_estimate()
    console.print(
        f"[bold]peak memory estimate:[/] {format_size(memory.anonymous_bytes)} allocated"
        f" (of which {format_size(memory.buffers_bytes)} buffers and kernel scratch),"
        f" {format_size(memory.mapped_input_bytes)} of mapped inputs resident (page cache)"
    )
    print_kernels(plan, console)


def kernel_groups(plan) -> list[tuple[str, str, int, int]]:
    """(tensor group, kernel, tensors, output bytes) in output order; a group is the tensor name
    with its layer index replaced by ``*``."""
    groups: dict[tuple[str, str], list[int]] = {}
    for job in plan.jobs:
        kernel = job.kernel.name + (f" ({job.kernel.reason})" if job.kernel.name == "torch" else "")
        entry = groups.setdefault((_LAYER_INDEX.sub(".*.", job.out_name), kernel), [0, 0])
        entry[0] += 1
        entry[1] += job.output_bytes
    return [(group, kernel, n, size) for (group, kernel), (n, size) in groups.items()]


def print_kernels(plan, console: Console) -> None:
    table = Table(title="kernels", show_lines=False)
    table.add_column("tensors")
    table.add_column("kernel")
    table.add_column("count", justify="right")
    table.add_column("output", justify="right")
    for group, kernel, n, size in kernel_groups(plan):
        table.add_row(escape(group), escape(kernel), str(n), format_size(size))
    console.print(table)


def print_vocabulary(plan, console: Console) -> None:
    """The output vocabulary and how each input's differs from it (read from the tokenizer files)."""
    v = plan.vocab
    if v.vocab_model is None:
        what = f"{v.source} (its tokenizer only: the model is not merged)"
    else:
        source = plan.models[v.vocab_model].label
        what = {"union": f"union, starting from {source}", "base": f"base: {source}"}.get(v.source, v.source)
    console.print(f"[bold]vocabulary:[/] {escape(what)}; {len(v.tokens)} tokens, {v.rows} embedding rows")
    if v.new_tokens:
        shown = ", ".join(repr(t) for t, _, _ in v.new_tokens[:8]) + (", ..." if len(v.new_tokens) > 8 else "")
        console.print(f"  appended: {len(v.new_tokens)} ({escape(shown)})")
    for d in v.diffs:
        console.print(f"  {escape(d.label)}: {escape(d.summary())}")


class MergeNarration:
    """What a merge says as it runs, beyond the default lines: with -v the plan summary before
    the merge and each phase's time and bytes after it; with -vv a line per tensor (its kernel,
    size and time)."""

    def __init__(self, console: Console, verbosity) -> None:
        self.console = console
        self.verbosity = verbosity
        self.phases: list = []

    def planned(self, plan) -> None:
        if self.verbosity.verbose:
            self.console.print(escape(plan.summary()), highlight=False, soft_wrap=True)

    def phase(self, phase) -> None:
        self.phases.append(phase)

    def tensor(self, job, seconds: float) -> None:
        kernel = job.kernel.name + (f" ({job.kernel.reason})" if job.kernel.name == "torch" else "")
        self.console.print(
            f"tensor {escape(job.out_name)}: {escape(kernel)}, {format_size(job.input_bytes)} read in {_duration(seconds)}",
            highlight=False,
            soft_wrap=True,
        )

    def finish(self) -> None:
        """With -v, a line per phase and the total."""
        if not self.verbosity.verbose:
            return
        for p in self.phases:
            moved = [f"{what} {format_size(n)}" for what, n in (("read", p.read), ("wrote", p.written)) if n]
            rate = f" ({format_size(round(p.read / p.seconds))}/s read)" if p.read and p.seconds > 0 else ""
            self.console.print(
                f"phase {p.name}: {_duration(p.seconds)}" + "".join(f", {m}" for m in moved) + rate,
                highlight=False,
                soft_wrap=True,
            )
        total = sum(p.seconds for p in self.phases)
        self.console.print(f"total: {_duration(total)}", highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
