"""Stream the plan: for each job read the inputs zero-copy, combine them, write the result.

Inputs are mmapped; the pages of the next few jobs are prefetched (madvise
WILLNEED) and those of finished jobs released (DONTNEED), so resident memory
follows the largest job rather than the model size. A background thread does the
positioned writes so that arithmetic and I/O overlap; its queue is bounded, and
output buffers are recycled so that no job pays for faulting in fresh memory.

The executor decides nothing: each job carries the kernel the plan chose for it
(mergekitty.kernels) and ``run_job`` dispatches on it. The native kernels (copy,
linear combination, GTA, a method's own native function) read the memory maps and write a recycled buffer without
importing torch; ``Torch`` jobs run ``MergeMethod.merge`` on torch tensors.

Every job also yields its health figures (NaN/Inf counts, sums of squares of its inputs and
output: health.py), which the native kernels gather on their own pass; the ``HealthReport``
refuses a non-finite output before it is handed to the writer.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import MergeError, MergekittyError
from .health import HealthReport, JobFigures, buffer_figures, tensor_figures
from .io.dtypes import nbytes, torch_dtype
from .kernels import Copy, CopyIfEqual, Gta, LinearCombination, Torch
from .plan import MergePlan, Source, TensorJob

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .tokenizer.embeddings import RawTensor

PREFETCH_JOBS = 2
WRITE_QUEUE = 2

# What a job hands the writer: the bytes (a map view or a pooled buffer's slice) and the pooled
# buffer to recycle once written (None for a map view or a fresh tensor); and its health figures.
Computed = tuple[Any, "np.ndarray | None", JobFigures]


class BufferPool:
    """Recycled byte buffers. Holds at most ``keep`` free buffers; takes the smallest that fits."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        import numpy as np

        with self.lock:
            fitting = [i for i, b in enumerate(self.free) if b.nbytes >= size]
            if fitting:
                return self.free.pop(min(fitting, key=lambda i: self.free[i].nbytes))
        return np.empty(max(size, 1), dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        # numpy arrays compare elementwise, so the list is handled by index, never by value
        with self.lock:
            self.free.append(buf)
            if len(self.free) > self.keep:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].nbytes))


class _BackgroundWriter:
    """Feeds ShardWriter.write from one thread; the first error is re-raised in the producer."""

    def __init__(self, writer: Any, pool: BufferPool) -> None:
        self.writer = writer
        self.pool = pool
        self.queue: queue.Queue[tuple[str, Any, np.ndarray | None] | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mergekitty-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            name, data, pooled = item
            if self.error is None:
                try:
                    self.writer.write(name, data)
                except BaseException as exc:  # surfaced in put()/close()
                    self.error = exc
            if pooled is not None:
                self.pool.give(pooled)

    def put(self, name: str, data: Any, pooled: np.ndarray | None = None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((name, data, pooled), timeout=0.1)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def close(self) -> None:
        self.stop()
        if self.error is not None:
            raise self.error


def run_job(plan: MergePlan, opened: list[Any], job: TensorJob, threads: int, pool: BufferPool) -> Computed:
    """Compute one output tensor with the kernel the plan chose for it.
    Returns (bytes to write, pooled buffer to recycle or None, health figures)."""
    kernel = job.kernel
    if isinstance(kernel, Torch):
        return _run_torch(plan, opened, job, threads, pool)
    inputs = _inputs(plan, opened, job)
    if isinstance(kernel, CopyIfEqual):
        _check_equal(plan, job, inputs)
    if isinstance(kernel, (Copy, CopyIfEqual)):
        view, code = inputs[kernel.input]
        copied = buffer_figures(view, code, math.prod(job.shape), threads)
        figures = tuple(copied if i == kernel.input else None for i in range(len(job.inputs)))
        return view, None, JobFigures(figures, copied)
    if isinstance(kernel, LinearCombination):
        return _run_linear(job, kernel, inputs, pool, threads)
    if isinstance(kernel, Gta):
        return _run_gta(plan, job, kernel, inputs, pool, threads)
    return _run_method(plan, job, inputs, pool, threads)


def _check_equal(plan: MergePlan, job: TensorJob, inputs: list[Input]) -> None:
    import numpy as np

    first = np.frombuffer(memoryview(inputs[0][0]), dtype=np.uint8)
    for (data, _), src in zip(inputs[1:], job.inputs[1:]):
        if not np.array_equal(first, np.frombuffer(memoryview(data), dtype=np.uint8)):
            raise MergeError(
                f"tensor '{job.out_name}' has dtype {job.out_dtype} and differs in {plan.models[src.model].label}; "
                "integer tensors cannot be merged"
            )


# an input's bytes (a map view or an aligned copy) and its safetensors dtype code
Input = tuple[Any, str]


def _inputs(plan: MergePlan, opened: list[Any], job: TensorJob) -> list[Input]:
    """The bytes of every job input for the native kernels: zero-copy map views, or for a
    vocabulary-sized tensor each input re-laid out in the output vocabulary's row order
    (tokenizer.embeddings), the default rows computed once for the job."""
    if not job.aligned or plan.vocab is None:
        return [(_view(plan, opened, s, job), _dtype(opened, s)) for s in job.inputs]
    aligned = _aligned(plan, opened, job)
    return [(a.data, a.dtype) for a in (aligned(s) for s in job.inputs)]


def _aligned(plan: MergePlan, opened: list[Any], job: TensorJob) -> Callable[[Source], RawTensor]:
    from .tokenizer.embeddings import align_rows, default_rows

    assert plan.vocab is not None, "aligned jobs come from a plan with a vocabulary"
    vocab = plan.vocab
    raw = {s.model: _raw(plan, opened, s, job) for s in (*job.inputs, *job.row_sources)}
    defaults = default_rows(vocab, raw)
    return lambda src: align_rows(vocab, src.model, raw[src.model], defaults)


def _raw(plan: MergePlan, opened: list[Any], src: Source, job: TensorJob) -> RawTensor:
    """An input as raw bytes: its map view, or (pickled, computed) its torch tensor's bytes."""
    from .tokenizer.embeddings import RawTensor

    info = opened[src.model].infos[src.tensor]
    view = opened[src.model].view(src.tensor)
    if view is None:
        from .ops.reduce import bytes_view

        view = bytes_view(opened[src.model].tensor(src.tensor).contiguous().cpu())
    return RawTensor(view, str(info.dtype), tuple(info.shape))


def _view(plan: MergePlan, opened: list[Any], src: Source, job: TensorJob) -> Any:
    """The zero-copy bytes of an input the plan found mapped."""
    view = opened[src.model].view(src.tensor)
    if view is None:  # the plan saw it mapped: the checkpoint changed under us
        raise MergeError(
            f"tensor '{job.out_name}': input '{src.tensor}' of {plan.models[src.model].label} is no longer mapped"
        )
    return view


def _dtype(opened: list[Any], src: Source) -> str:
    return str(opened[src.model].infos[src.tensor].dtype)


def _out_buffer(job: TensorJob, pool: BufferPool) -> tuple[Any, np.ndarray]:
    size = nbytes(job.out_dtype, math.prod(job.shape))
    buf = pool.take(size)
    return buf[:size], buf


def _run_linear(
    job: TensorJob, kernel: LinearCombination, inputs: list[Input], pool: BufferPool, threads: int
) -> Computed:
    from . import _native

    used = [inputs[i] for i, _ in kernel.terms]
    out, buf = _out_buffer(job, pool)
    health = _native.weighted_sum(
        [v for v, _ in used], [d for _, d in used], [c for _, c in kernel.terms], out, job.out_dtype, threads
    )
    return out, buf, JobFigures.from_native(job, [i for i, _ in kernel.terms], health)


def _run_gta(
    plan: MergePlan, job: TensorJob, kernel: Gta, inputs: list[Input], pool: BufferPool, threads: int
) -> Computed:
    from .ops.native_dispatch import gta_merge_views

    (base, base_dtype), *sources = inputs
    out, buf = _out_buffer(job, pool)
    health = gta_merge_views(
        [v for v, _ in sources],
        [d for _, d in sources],
        base,
        base_dtype,
        tuple(job.shape),
        kernel.spec,
        plan.random_seed,
        out,
        job.out_dtype,
        threads,
    )
    # the kernel reports the sources, then the base
    return out, buf, JobFigures.from_native(job, [*range(1, len(job.inputs)), 0], health)


def _run_method(plan: MergePlan, job: TensorJob, inputs: list[Input], pool: BufferPool, threads: int) -> Computed:
    from .methods.base import NativeInputs, TorchFunction

    compute = plan.method.compute
    if not isinstance(compute, TorchFunction) or compute.native is None:
        raise MergeError(f"tensor '{job.out_name}': merge method '{plan.method.name}' has no native kernel")
    out, buf = _out_buffer(job, pool)
    health = compute.native(
        NativeInputs(
            name=job.out_name,
            inputs=[v for v, _ in inputs],
            dtypes=[d for _, d in inputs],
            has_base=job.base is not None,
            shape=tuple(job.shape),
            params=job.params,
            model_params=list(job.model_params),
            out=out,
            out_dtype=job.out_dtype,
            threads=threads,
        )
    )
    return out, buf, JobFigures.from_native(job, list(range(len(job.inputs))), health)


def _run_torch(plan: MergePlan, opened: list[Any], job: TensorJob, threads: int, pool: BufferPool) -> Computed:
    import torch

    from .methods.base import MergeInputs
    from .ops.reduce import bytes_view

    dev = torch.device(plan.device)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

    def load(src: Source) -> torch.Tensor:
        t: torch.Tensor = opened[src.model].tensor(src.tensor)
        return t if dev.type == "cpu" else t.to(dev, non_blocking=True)

    read = _aligned_loader(plan, opened, job, dev) if job.aligned else load

    out_dtype = torch_dtype(job.out_dtype)
    if out_dtype is None:
        raise MergeError(f"tensor '{job.out_name}': torch has no dtype for {job.out_dtype}")
    size = nbytes(job.out_dtype, math.prod(job.shape))
    buf = pool.take(size) if dev.type == "cpu" and size else None
    out = torch.from_numpy(buf[:size]).view(out_dtype).view(job.shape) if buf is not None else None
    tensors = [read(s) for s in job.sources]
    base = read(job.base) if job.base else None
    result = plan.method.merge(
        MergeInputs(
            name=job.out_name,
            tensors=tensors,
            model_params=list(job.model_params),
            params=job.params,
            base=base,
            out_dtype=out_dtype,
            threads=threads,
            out=out,
            seed=plan.random_seed,
        )
    )
    if tuple(result.shape) != tuple(job.shape):
        raise MergeError(
            f"merge method '{plan.method.name}' returned shape {tuple(result.shape)} for '{job.out_name}', expected {job.shape}"
        )
    inputs = tuple(tensor_figures(t, threads) for t in ([base] if base is not None else []) + tensors)
    if out is None or buf is None:
        written = result.to(out_dtype).cpu().contiguous()
        return bytes_view(written), None, JobFigures(inputs, tensor_figures(written, threads))
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)
    return buf[:size], buf, JobFigures(inputs, tensor_figures(out, threads))


def _aligned_loader(
    plan: MergePlan, opened: list[Any], job: TensorJob, dev: torch.device
) -> Callable[[Source], torch.Tensor]:
    """The torch path's reader of a vocabulary-sized tensor: the aligned bytes as a tensor on ``dev``."""
    import warnings

    import torch

    aligned = _aligned(plan, opened, job)

    def load(src: Source) -> torch.Tensor:
        a = aligned(src)
        dtype = torch_dtype(a.dtype)
        if dtype is None:
            raise MergeError(f"tensor '{job.out_name}': torch has no dtype for {a.dtype}")
        with warnings.catch_warnings():  # a map view is read-only; the methods never write inputs
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(memoryview(a.data), dtype=torch.uint8)
        return t.view(dtype).reshape(a.shape).to(dev)

    return load


def _touch(opened: list[Any], job: TensorJob, action: str) -> None:
    for s in (*job.inputs, *job.row_sources):
        getattr(opened[s.model], action)(s.tensor)


def compute(
    plan: MergePlan, opened: list[Any], job: TensorJob, threads: int, pool: BufferPool, report: HealthReport
) -> Computed:
    """``run_job``, then the checks every computed tensor passes before anyone uses it: the inputs
    it read are intact, and its health figures are recorded (a refused non-finite output raises).
    An error is a MergekittyError naming the tensor."""
    try:
        computed = run_job(plan, opened, job, threads, pool)
        check_inputs(opened, job)  # first: a changed input explains any odd figure
        report.record(job, computed[2])
        return computed
    except MergekittyError:
        raise
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        raise MergeError(f"tensor '{job.out_name}': {exc}") from exc


def check_inputs(opened: list[Any], job: TensorJob | None = None) -> None:
    """Raise ModelFormatError naming the file if an input file the job read (every input when
    ``job`` is None) changed while mapped: what was computed from it is zeros or another
    file's bytes, and must not reach the output."""
    if job is None:
        for checkpoint in opened:
            checkpoint.check_intact()
        return
    read: dict[int, list[str]] = {}
    for s in (*job.inputs, *job.row_sources):
        read.setdefault(s.model, []).append(s.tensor)
    for model, names in read.items():
        opened[model].check_intact(names)


def execute(
    plan: MergePlan,
    writer: Any,
    threads: int = 0,
    on_progress: Callable[[TensorJob, float], None] | None = None,
    health: HealthReport | None = None,
) -> None:
    """Run every job of ``plan`` and hand each result to ``writer`` (a native ShardWriter).
    The inputs are opened here from what the plan recorded of them. Each job's figures go to
    ``health`` (a fresh report refusing non-finite outputs when None): a job it refuses raises
    its ``NonFiniteError`` before the tensor reaches the writer."""
    report = health if health is not None else HealthReport.for_plan(plan)
    opened = [m.open(plan.device, threads, report.allow_nonfinite) for m in plan.models]
    pool = BufferPool(keep=WRITE_QUEUE + 2)
    background = _BackgroundWriter(writer, pool)
    try:
        for i, job in enumerate(plan.jobs):
            for ahead in plan.jobs[i + 1 : i + 1 + PREFETCH_JOBS]:
                _touch(opened, ahead, "prefetch")
            started = time.perf_counter()
            data, pooled, _ = compute(plan, opened, job, threads, pool, report)
            background.put(job.out_name, data, pooled)
            del data, pooled
            _touch(opened, job, "release")
            if on_progress is not None:
                on_progress(job, time.perf_counter() - started)
    except BaseException as exc:
        background.stop()  # the caller aborts the writer
        if isinstance(exc, Exception):
            check_inputs(opened)  # an input that changed is the cause to name, not what it broke
        raise
    try:
        background.close()
    finally:
        check_inputs(opened)  # the writer copied mapped inputs until now
