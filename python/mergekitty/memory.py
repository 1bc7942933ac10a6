"""What a plan will hold in memory, from the kernel the plan chose for each job.

Two figures, reported apart because they cost a machine differently:
- anonymous memory: what the process allocates (output buffers, kernel scratch, torch's working
  copies, the interpreter and the libraries). This is what must fit in RAM.
- mapped inputs: the input pages resident at once (the job being computed and the ones being
  prefetched). They are page cache: the kernel drops them under pressure, the executor releases
  each job's pages when it is done.

The output buffers are simulated exactly as the executor recycles them (execute.BufferPool): a
job takes the smallest free buffer that fits or allocates one; at worst the writer still holds
the three previous jobs' buffers (one being written, two queued) when the next job takes its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .io.dtypes import nbytes
from .kernels import Copy, CopyIfEqual, Gta, LinearCombination, MethodKernel, Torch

if TYPE_CHECKING:
    from .methods.base import MergeMethod
    from .plan import MergePlan, TensorJob

# The interpreter with numpy, pydantic and the native module loaded, the headers and vocabularies
# read (measured: 25-28 MB), and what importing torch adds on top (measured: ~260 MB, torch 2.x).
PROCESS_BYTES = 26 << 20
TORCH_IMPORT_BYTES = 260 << 20
# Fused GTA thresholds: above this many elements a strided sample of runs is ranked first
# (rust/src/kernels/gta.rs: SAMPLED_MIN_N, SAMPLE_RUN, SAMPLE_STRIDE); below it, 4-byte keys.
SAMPLED_MIN_N = 1 << 20
SAMPLE_RUN = 64
SAMPLE_STRIDE = 4093
# float32 working copies (per input, fixed) of the torch references of the native methods
LINEAR_TORCH_COPIES = (0.0, 1.0)  # one accumulator
GTA_TORCH_COPIES = (2.0, 2.0)  # task vectors and their sparsified copies, the combined result
# Allocated while a merge runs besides the jobs (modules imported, the writer, tokenizer files).
RUN_BYTES = 4 << 20
# The shard writer's aligned staging buffer, used once a tensor is large enough for direct I/O
# (rust/src/direct_io.rs: STAGE, MIN_DIRECT).
WRITER_STAGE_BYTES = 16 << 20
DIRECT_IO_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class MemoryEstimate:
    anonymous_bytes: int  # peak allocated by the process, interpreter included
    buffers_bytes: int  # of which: output buffers and kernel scratch at the worst moment
    mapped_input_bytes: int  # peak resident input pages (page cache, released job by job)


def estimate(plan: MergePlan, prefetch: int = 2, in_flight: int = 3, keep_free: int = 4) -> MemoryEstimate:
    """The peak memory of executing ``plan`` (see the module docstring). ``prefetch``, ``in_flight``
    and ``keep_free`` mirror execute.PREFETCH_JOBS, WRITE_QUEUE + 1 and the pool's ``keep``."""
    jobs = plan.jobs
    free: list[int] = []  # sizes of the pool's free buffers
    # buffers the writer still holds, oldest first: (bytes, whether it goes back to the pool)
    pending: list[tuple[int, bool]] = []
    peak = 0
    by_name: dict[int, dict[str, TensorJob]] = {}  # per stage plan (by id): its jobs by output name
    for job in jobs:
        if len(pending) >= in_flight:
            size, pooled = pending.pop(0)
            if pooled:
                _give(free, size, keep_free)
        wanted = _buffer_bytes(job, plan.device)
        pooled = wanted is not None
        if wanted is not None:
            fitting = [b for b in free if b >= wanted]
            if fitting:
                wanted = min(fitting)
                free.remove(wanted)
            size = max(wanted, 1)
        else:  # a copy: of a map (nothing held), or of a recipe stage's tensor, which the writer holds
            size = _copied_stage_bytes(plan, job, by_name)
        held = sum(free) + sum(b for b, _ in pending) + size
        peak = max(peak, held + _scratch_bytes(job, plan.method) + _stage_bytes(plan, job, by_name))
        pending.append((size, pooled))
    uses_torch = any(isinstance(j.kernel, Torch) for p in _plans(plan) for j in p.jobs)
    base = PROCESS_BYTES + RUN_BYTES + (TORCH_IMPORT_BYTES if uses_torch else 0)
    if any(j.output_bytes >= DIRECT_IO_MIN_BYTES for j in jobs) and not os.environ.get("MERGEKITTY_NO_DIRECT_IO"):
        peak += WRITER_STAGE_BYTES
    window = prefetch + 1
    mapped = max((sum(j.input_bytes for j in jobs[i : i + window]) for i in range(len(jobs))), default=0)
    return MemoryEstimate(base + peak, peak, mapped)


def _plans(plan: MergePlan) -> list[MergePlan]:
    """``plan`` and the plans of the recipe stages it reads, through every stage."""
    out = [plan]
    for m in plan.models:
        if m.stage is not None:
            out += _plans(m.stage)
    return out


def _stage_job(plan: MergePlan, model: int, tensor: str, by_name: dict[int, dict[str, TensorJob]]) -> TensorJob | None:
    """The job of the recipe stage ``plan.models[model]`` that computes ``tensor`` (None: not a stage)."""
    stage = plan.models[model].stage
    if stage is None:
        return None
    jobs = by_name.get(id(stage))
    if jobs is None:
        jobs = by_name[id(stage)] = {j.out_name: j for j in stage.jobs}
    return jobs[tensor]


def _copied_stage_bytes(plan: MergePlan, job: TensorJob, by_name: dict[int, dict[str, TensorJob]]) -> int:
    """A copy job's bytes the writer holds: those of a recipe stage's computed tensor it copies."""
    kernel = job.kernel
    if not isinstance(kernel, (Copy, CopyIfEqual)) or plan.device != "cpu":
        return 0
    src = job.inputs[kernel.input]
    inner = _stage_job(plan, src.model, src.tensor, by_name)
    return inner.output_bytes if inner is not None and not isinstance(inner.kernel, (Copy, CopyIfEqual)) else 0


def _stage_bytes(plan: MergePlan, job: TensorJob, by_name: dict[int, dict[str, TensorJob]]) -> int:
    """What computing the inputs of ``job`` that are recipe stages holds (recipe.stage): each
    such input's bytes until the job ends, and at worst the scratch of one stage job (and of the
    stages it reads) while it is computed."""
    held, scratch = 0, 0
    for s in (*job.inputs, *job.row_sources):
        inner = _stage_job(plan, s.model, s.tensor, by_name)
        if inner is None:
            continue
        stage = plan.models[s.model].stage
        assert stage is not None
        held += _buffer_bytes(inner, stage.device) or 0
        scratch = max(scratch, _scratch_bytes(inner, stage.method) + _stage_bytes(stage, inner, by_name))
    return held + scratch


def _give(free: list[int], size: int, keep: int) -> None:
    free.append(size)
    if len(free) > keep:
        free.remove(min(free))


def _buffer_bytes(job: TensorJob, device: str) -> int | None:
    """The pooled output buffer a job takes (None: written straight from the map or from the GPU)."""
    if isinstance(job.kernel, (Copy, CopyIfEqual)) or (isinstance(job.kernel, Torch) and device != "cpu"):
        return None
    return nbytes(job.out_dtype, math.prod(job.shape))


def _scratch_bytes(job: TensorJob, method: MergeMethod) -> int:
    """What the job's kernel allocates besides its output buffer."""
    n = math.prod(job.shape)
    kernel = job.kernel
    if isinstance(kernel, (Copy, CopyIfEqual, LinearCombination)):
        return 0
    if isinstance(kernel, Gta):
        ranked = sum(s.kind in ("magnitude", "outliers") and 0 < s.density < 1 for s in kernel.spec.sparsity)
        l1 = 4 * n if any(s.rescale == "l1" for s in kernel.spec.sparsity) else 0  # the kept values' pass
        if not ranked:
            return l1
        keys = math.ceil(n / SAMPLE_STRIDE) * SAMPLE_RUN if n >= SAMPLED_MIN_N else n
        return 4 * keys * ranked + l1
    if isinstance(kernel, MethodKernel):
        return int(4 * n * _native_copies(method, job.params))
    # torch: the float32 working copies the method declares, per input and fixed
    per_input, fixed = _working_copies(method)
    inputs = len(job.inputs) + len(job.row_sources)
    return int(4 * n * (per_input * inputs + fixed))


def _native_copies(method: MergeMethod, params: dict[str, Any]) -> float:
    from .methods.base import TorchFunction

    compute = method.compute
    if not isinstance(compute, TorchFunction):
        return 0.0
    copies = compute.native_copies
    return copies(params) if callable(copies) else copies


def _working_copies(method: MergeMethod) -> tuple[float, float]:
    from .methods.base import GtaSpecBuilder, LinearCoefficients, TorchFunction

    compute = method.compute
    if isinstance(compute, TorchFunction):
        return compute.working_copies
    if isinstance(compute, LinearCoefficients):
        return LINEAR_TORCH_COPIES
    assert isinstance(compute, GtaSpecBuilder)
    return GTA_TORCH_COPIES
