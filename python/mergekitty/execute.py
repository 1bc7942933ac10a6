"""Stream the plan: for each job take zero-copy views, run the method, cast, write.

Inputs are mmapped; the pages of the next few jobs are prefetched (madvise
WILLNEED) and those of finished jobs released (DONTNEED), so resident memory
follows the largest job rather than the model size. A background thread does the
positioned writes so that arithmetic and I/O overlap; its queue is bounded.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from .io.dtypes import CODE_TO_TORCH
from .methods.base import MergeInputs
from .plan import MergePlan, TensorJob

PREFETCH_JOBS = 2
WRITE_QUEUE = 2


class _BackgroundWriter:
    """Feeds ShardWriter.write from one thread; the first error is re-raised in the producer."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mergekitty-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            name, tensor = item
            if self.error is not None:
                continue
            try:
                self.writer.write(name, tensor.reshape(-1).view(torch.uint8).numpy())
            except BaseException as exc:  # surfaced in put()/close()
                self.error = exc

    def put(self, name: str, tensor: torch.Tensor) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((name, tensor), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _load(plan: MergePlan, job: TensorJob, device: torch.device):
    def get(src):
        t = plan.models[src.model].checkpoint.tensor(src.tensor)
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    return [get(s) for s in job.sources], (get(job.base) if job.base else None)


def _touch(plan: MergePlan, job: TensorJob, action: str) -> None:
    for s in (*job.sources, *((job.base,) if job.base else ())):
        getattr(plan.models[s.model].checkpoint, action)(s.tensor)


def run_job(plan: MergePlan, job: TensorJob, device: torch.device, threads: int) -> torch.Tensor:
    """Compute one output tensor on ``device``; returns a contiguous CPU tensor in the output dtype."""
    tensors, base = _load(plan, job, device)
    out_dtype = CODE_TO_TORCH[job.out_dtype]
    result = plan.method.merge(
        MergeInputs(
            name=job.out_name,
            tensors=tensors,
            model_params=list(job.model_params),
            params=job.params,
            base=base,
            out_dtype=out_dtype,
            threads=threads,
        )
    )
    if result.dtype != out_dtype:
        result = result.to(out_dtype)
    if result.device.type != "cpu":
        result = result.cpu()
    if tuple(result.shape) != job.shape:
        result = result.reshape(job.shape)
    return result.contiguous()


def execute(
    plan: MergePlan,
    writer,
    device: str = "cpu",
    threads: int = 0,
    on_progress: Callable[[TensorJob, float], None] | None = None,
) -> None:
    """Run every job of ``plan`` and hand each result to ``writer`` (a native ShardWriter)."""
    dev = torch.device(device)
    background = _BackgroundWriter(writer)
    try:
        for i, job in enumerate(plan.jobs):
            for ahead in plan.jobs[i + 1 : i + 1 + PREFETCH_JOBS]:
                _touch(plan, ahead, "prefetch")
            started = time.perf_counter()
            result = run_job(plan, job, dev, threads)
            background.put(job.out_name, result)
            del result
            _touch(plan, job, "release")
            if on_progress is not None:
                on_progress(job, time.perf_counter() - started)
    except BaseException:
        background.queue.put(None)  # stop the thread; the caller aborts the writer
        background.thread.join(timeout=10)
        raise
    background.close()
