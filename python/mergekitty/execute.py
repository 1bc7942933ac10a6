"""Stream the plan: for each job read the inputs zero-copy, combine them, write the result.

Inputs are mmapped; the pages of the next few jobs are prefetched (madvise
WILLNEED) and those of finished jobs released (DONTNEED), so resident memory
follows the largest job rather than the model size. A background thread does the
positioned writes so that arithmetic and I/O overlap; its queue is bounded, and
output buffers are recycled so that no job pays for faulting in fresh memory.

Two paths compute a job:
- native: methods that are fixed linear combinations (``MergeMethod.coefficients``)
  and the GTA family (``MergeMethod.fused_gta``: ties, dare, della, breadcrumbs) on
  CPU, over bf16/f16/f32 safetensors inputs, run as fused Rust passes from the
  memory maps into a recycled buffer; a plain copy is written straight from the map.
  This path never imports torch.
- torch: everything else (other methods, other devices, .bin inputs) through
  ``MergeMethod.merge`` on torch tensors.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from .errors import MergeError, MergekittyError
from .io.dtypes import NATIVE_FLOAT_CODES, nbytes, torch_dtype
from .plan import MergePlan, TensorJob

PREFETCH_JOBS = 2
WRITE_QUEUE = 2


class BufferPool:
    """Recycled byte buffers. Holds at most ``keep`` free buffers; takes the smallest that fits."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list = []
        self.lock = threading.Lock()

    def take(self, size: int):
        import numpy as np

        with self.lock:
            fitting = [i for i, b in enumerate(self.free) if b.nbytes >= size]
            if fitting:
                return self.free.pop(min(fitting, key=lambda i: self.free[i].nbytes))
        return np.empty(max(size, 1), dtype=np.uint8)

    def give(self, buf) -> None:
        # numpy arrays compare elementwise, so the list is handled by index, never by value
        with self.lock:
            self.free.append(buf)
            if len(self.free) > self.keep:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].nbytes))


class _BackgroundWriter:
    """Feeds ShardWriter.write from one thread; the first error is re-raised in the producer."""

    def __init__(self, writer, pool: BufferPool) -> None:
        self.writer = writer
        self.pool = pool
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
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

    def put(self, name: str, data, pooled=None) -> None:
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


def _inputs(job: TensorJob) -> tuple:
    return (*((job.base,) if job.base else ()), *job.sources)


def _linear_terms(plan: MergePlan, job: TensorJob) -> list[tuple] | None:
    """(source, coefficient) pairs when the job is a fixed linear combination, else None."""
    coefficients = plan.method.coefficients
    if coefficients is None:
        return None
    base_coef, coefs = coefficients(job.params, list(job.model_params), job.out_name)
    terms = list(zip(job.sources, coefs))
    if job.base is not None and (base_coef != 0.0 or not terms):
        terms.insert(0, (job.base, base_coef))
    return terms


def _run_native(plan: MergePlan, job: TensorJob, terms, pool: BufferPool, threads: int):
    """Compute ``job`` without torch. Returns (bytes to write, pooled buffer or None), or None
    when the native kernels cannot take this job."""
    from . import _native

    views, codes = [], []
    for src, _ in terms:
        view = plan.models[src.model].checkpoint.view(src.tensor)
        if view is None:
            return None
        views.append(view)
        codes.append(plan.models[src.model].checkpoint.infos[src.tensor].dtype)
    if len(terms) == 1 and terms[0][1] == 1.0 and codes[0] == job.out_dtype:
        return views[0], None  # a plain copy: written straight from the memory map
    if job.out_dtype not in NATIVE_FLOAT_CODES or any(c not in NATIVE_FLOAT_CODES for c in codes):
        return None
    size = nbytes(job.out_dtype, _numel(job.shape))
    buf = pool.take(size)
    out = buf[:size]
    _native.weighted_sum(views, codes, [float(c) for _, c in terms], out, job.out_dtype, threads)
    return out, buf


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _run_native_gta(plan: MergePlan, job: TensorJob, pool: BufferPool, threads: int):
    """A GTA-family job (ties, dare_*, della*, breadcrumbs*) as one fused native pass from the
    memory maps, without torch: (bytes, pooled buffer), or None for the torch path."""
    from .methods.base import MergeInputs
    from .methods.gta import warn_zero_sum
    from .ops.native_dispatch import gta_merge_views

    if job.base is None or not job.sources:
        return None
    inputs = MergeInputs(
        name=job.out_name, tensors=[], model_params=list(job.model_params), params=job.params, seed=plan.random_seed
    )
    fused = plan.method.fused_gta(inputs)
    if fused is None:
        return None
    views, codes = [], []
    for src in (job.base, *job.sources):
        checkpoint = plan.models[src.model].checkpoint
        info = checkpoint.infos[src.tensor]
        view = checkpoint.view(src.tensor) if tuple(info.shape) == tuple(job.shape) else None
        if view is None:
            return None  # cropped embeddings, computed (model+lora) or pickled inputs
        views.append(view)
        codes.append(info.dtype)
    size = nbytes(job.out_dtype, _numel(job.shape))
    buf = pool.take(size)
    out = buf[:size]
    done = gta_merge_views(
        views[1:], codes[1:], views[0], codes[0], tuple(job.shape), fused.specs, fused.weights,
        fused.consensus, fused.normalize, fused.lam, plan.random_seed, out, job.out_dtype, threads,
    )  # fmt: skip
    if not done:
        pool.give(buf)
        return None
    warn_zero_sum(inputs, fused)
    return out, buf


def run_job(plan: MergePlan, job: TensorJob, device: str, threads: int, pool: BufferPool):
    """Compute one output tensor. Returns (bytes to write, pooled buffer to recycle or None)."""
    if device == "cpu" and not job.aligned:
        terms = _linear_terms(plan, job)
        if terms is not None:
            done = _run_native(plan, job, terms, pool, threads)
            if done is not None:
                return done
        elif plan.method.fused_gta is not None:
            done = _run_native_gta(plan, job, pool, threads)
            if done is not None:
                return done
    return _run_torch(plan, job, device, threads, pool)


def _run_torch(plan: MergePlan, job: TensorJob, device: str, threads: int, pool: BufferPool):
    import torch

    from .methods.base import MergeInputs
    from .ops.reduce import bytes_view

    dev = torch.device(device)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

    def load(src):
        t = plan.models[src.model].checkpoint.tensor(src.tensor)
        return t if dev.type == "cpu" else t.to(dev, non_blocking=True)

    if job.aligned:
        load = _aligned_loader(plan, job, load)

    out_dtype = torch_dtype(job.out_dtype)
    size = nbytes(job.out_dtype, _numel(job.shape))
    buf = pool.take(size) if dev.type == "cpu" and size else None
    out = torch.from_numpy(buf[:size]).view(out_dtype).view(job.shape) if buf is not None else None
    result = plan.method.merge(
        MergeInputs(
            name=job.out_name,
            tensors=[load(s) for s in job.sources],
            model_params=list(job.model_params),
            params=job.params,
            base=load(job.base) if job.base else None,
            out_dtype=out_dtype,
            threads=threads,
            out=out,
            seed=plan.random_seed,
        )
    )
    if tuple(result.shape) != tuple(job.shape):
        raise ValueError(
            f"merge method '{plan.method.name}' returned shape {tuple(result.shape)} for '{job.out_name}', expected {job.shape}"
        )
    if out is None:
        return bytes_view(result.to(out_dtype).cpu().contiguous()), None
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)
    return buf[:size], buf


def _aligned_loader(plan: MergePlan, job: TensorJob, load):
    """``load`` for a vocabulary-sized tensor: each input re-laid out in the output vocabulary's
    row order (tokenizer.embeddings), with the default rows computed once for the job."""
    from .tokenizer.embeddings import align_rows, default_rows

    loaded = {s.model: load(s) for s in (*_inputs(job), *job.row_sources)}
    defaults = default_rows(plan.vocab, loaded)
    return lambda src: align_rows(plan.vocab, src.model, loaded[src.model], defaults)


def _touch(plan: MergePlan, job: TensorJob, action: str) -> None:
    for s in (*_inputs(job), *job.row_sources):
        getattr(plan.models[s.model].checkpoint, action)(s.tensor)


def execute(
    plan: MergePlan,
    writer,
    device: str = "cpu",
    threads: int = 0,
    on_progress: Callable[[TensorJob, float], None] | None = None,
) -> None:
    """Run every job of ``plan`` and hand each result to ``writer`` (a native ShardWriter)."""
    pool = BufferPool(keep=WRITE_QUEUE + 2)
    background = _BackgroundWriter(writer, pool)
    try:
        for i, job in enumerate(plan.jobs):
            for ahead in plan.jobs[i + 1 : i + 1 + PREFETCH_JOBS]:
                _touch(plan, ahead, "prefetch")
            started = time.perf_counter()
            try:
                data, pooled = run_job(plan, job, device, threads, pool)
                background.put(job.out_name, data, pooled)
            except MergekittyError:
                raise
            except (ValueError, TypeError, RuntimeError, OSError) as exc:
                raise MergeError(f"tensor '{job.out_name}': {exc}") from exc
            del data, pooled
            _touch(plan, job, "release")
            if on_progress is not None:
                on_progress(job, time.perf_counter() - started)
    except BaseException:
        background.stop()  # the caller aborts the writer
        raise
    background.close()
