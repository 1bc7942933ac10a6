"""Progress bars: on stderr, and only where someone watches (a terminal or a notebook): in a
pipe or a log file a bar is noise. ``run_with_progress`` is the merge's: tensors done, bytes
read, GB/s and ETA."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

if TYPE_CHECKING:
    from .plan import MergePlan


def stderr_progress(*columns: Any, **kwargs: Any) -> Progress:
    """A rich Progress on stderr, shown only when stderr is a terminal or a notebook."""
    console = kwargs.pop("console", None) or Console(stderr=True)
    return Progress(*columns, console=console, disable=not (console.is_terminal or console.is_jupyter), **kwargs)


class _Throughput(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- GB/s" if not speed else f"{speed / 1e9:.2f} GB/s")


class _Tensors(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.fields.get('tensors', 0)}/{task.fields.get('total_tensors', 0)} tensors")


def run_with_progress(plan: MergePlan, body: Callable[[Callable[[Any, float], None]], None]) -> None:
    """Run ``body(callback)`` while showing progress; the callback is called after each job."""
    columns = [
        TextColumn("[bold]merging"),
        BarColumn(),
        TaskProgressColumn(),
        _Tensors(),
        _Throughput(),
        TimeRemainingColumn(),
    ]
    with stderr_progress(*columns, transient=False) as bar:
        task = bar.add_task("merge", total=plan.input_bytes or 1, tensors=0, total_tensors=len(plan.jobs))
        done = [0]

        def callback(job: Any, _seconds: float) -> None:
            done[0] += 1
            bar.update(task, advance=job.input_bytes, tensors=done[0])

        body(callback)
