"""The health report of a merge: non-finite values, norms far from every parent's, the seed.

For every job the executor hands ``HealthReport.record`` the job's ``JobFigures``: for each input
and for the output as written, how many elements are NaN or +-Inf and the sum of squares of the
others. The native kernels gather them on the pass they make over the tensors anyway
(``_native.TensorHealth``); a copied tensor gets one native scan (``scan_health``), and the torch
path (the slow path) computes them with torch or the same scan.

``record`` refuses a job whose output holds a non-finite value (``NonFiniteError``, before the
tensor is written, so the output transaction aborts) unless the merge allows it
(``--allow-nonfinite``); non-finite inputs that do not reach the output (TIES drops a NaN whose
neighbours outvote it) are warnings. A norm far from every parent's is a warning too.

At the end the report is a few summary lines (``summary_lines``, the CLI prints them) and, with
``--json``, ``mergekitty_health.json`` next to the model (``to_json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import NonFiniteError
from .text import dtype_text

if TYPE_CHECKING:
    import torch
    from typing_extensions import Buffer

    from .plan import MergePlan, TensorJob

HEALTH_FILE = "mergekitty_health.json"
FORMAT = "mergekitty-health/1"

# A merge combines related checkpoints (fine-tunes of one base), so its output's norm stays close
# to theirs: a convex combination never exceeds the largest parent's norm, task vectors are small
# next to the base, slerp-like methods keep the norm; even an average of k unrelated tensors only
# shrinks it by 1/sqrt(k) (1/4 at sixteen). An output more than NORM_RATIO times every parent's
# norm per element (RMS, so that tensors of another shape compare), or less than 1/NORM_RATIO of
# it, is therefore a sign of a wrong parameter: weights that do not sum to what was meant, a
# lambda or scale typo, a weight with the wrong sign cancelling the others.
NORM_RATIO = 4.0
# Below this RMS a tensor is zero for this purpose (zero-initialized biases and the noise their
# fine-tunes added): ratios to or from it say nothing. Real weights are ~1e-2, norms ~1.
TINY_RMS = 1e-6
# The summary names at most this many tensors per kind of problem; the JSON has them all.
SHOWN = 8


@dataclass(frozen=True)
class Figures:
    """One tensor: its NaN/Inf count and the sum of the squares of its finite elements."""

    nonfinite: int
    sumsq: float
    numel: int

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def rms(self) -> float:
        return math.sqrt(self.sumsq / self.numel) if self.numel else 0.0


@dataclass(frozen=True)
class JobFigures:
    """One job: a ``Figures`` per ``TensorJob.inputs`` entry (None for an input the kernel did not
    read, or one that is not a float tensor) and for the output (None: not a float tensor)."""

    inputs: tuple[Figures | None, ...]
    output: Figures | None

    @staticmethod
    def from_native(job: TensorJob, read: list[int], health: Any) -> JobFigures:
        """From a ``_native.TensorHealth`` whose inputs are ``job.inputs[read[0]], ...``."""
        numel = math.prod(job.shape)
        inputs: list[Figures | None] = [None] * len(job.inputs)
        for k, i in enumerate(read):
            inputs[i] = Figures(health.input_nonfinite[k], health.input_sumsq[k], numel)
        return JobFigures(tuple(inputs), Figures(health.output_nonfinite, health.output_sumsq, numel))


def buffer_figures(data: Buffer, code: str, numel: int, threads: int = 0) -> Figures | None:
    """The figures of a tensor's raw little-endian bytes (a copied tensor); None unless it is F64,
    F32, F16 or BF16."""
    from . import _native
    from .io.dtypes import NATIVE_FLOAT_CODES

    if code in NATIVE_FLOAT_CODES:
        h = _native.scan_health(data, code, threads)
        return Figures(h.output_nonfinite, h.output_sumsq, numel)
    if code == "F64":
        import numpy as np

        values = np.frombuffer(memoryview(data), dtype="<f8")
        nonfinite, sumsq = 0, 0.0
        with np.errstate(over="ignore"):  # finite values above 1e154 square to inf: so is the norm
            for start in range(0, values.size, 1 << 22):
                chunk = values[start : start + (1 << 22)]
                finite = chunk[np.isfinite(chunk)]
                nonfinite += chunk.size - finite.size
                sumsq += float(np.dot(finite, finite))
        return Figures(nonfinite, sumsq, numel)
    return None


def tensor_figures(t: torch.Tensor, threads: int = 0) -> Figures | None:
    """The figures of a torch tensor; None unless it is a floating-point tensor. CPU tensors of the
    native dtypes take the native scan; others (F64, GPU) torch, in float64 chunks."""
    import torch

    from .io.dtypes import NATIVE_FLOAT_CODES, code_of
    from .ops.reduce import bytes_view

    if not t.is_floating_point():
        return None
    if t.device.type == "cpu" and code_of(t.dtype) in NATIVE_FLOAT_CODES:
        return buffer_figures(bytes_view(t.contiguous()), str(code_of(t.dtype)), t.numel(), threads)
    nonfinite, sumsq = 0, 0.0
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), 1 << 22):
        c = flat[start : start + (1 << 22)].double()
        finite = torch.isfinite(c)
        nonfinite += int((~finite).sum())
        sumsq += float(torch.where(finite, c, 0.0).square().sum())
    return Figures(nonfinite, sumsq, t.numel())


@dataclass(frozen=True)
class NonFiniteInput:
    tensor: str  # the output tensor
    model: str  # the input model's label
    source: str  # the tensor's name in that model
    count: int
    reached_output: bool


@dataclass(frozen=True)
class NonFiniteOutput:
    tensor: str
    count: int
    numel: int
    inputs: tuple[NonFiniteInput, ...]  # the job's inputs that had non-finite values


@dataclass(frozen=True)
class NormOutlier:
    tensor: str
    output_norm: float
    parents: tuple[tuple[str, float], ...]  # (model label, norm)
    ratio: float  # output RMS over the largest (above) or smallest (below) parent RMS


def _models(inputs: tuple[NonFiniteInput, ...]) -> str:
    return ", ".join(f"{i.model} ({_nan_values(i.count)} in '{i.source}')" for i in inputs)


@dataclass
class HealthReport:
    """What the merge of ``plan`` found, filled job by job (``record``)."""

    method: str
    random_seed: int | None  # None for a method that draws no random numbers
    allow_nonfinite: bool = False
    tensors_written: int = 0
    tensors_checked: int = 0  # those with float figures
    nonfinite_inputs: list[NonFiniteInput] = field(default_factory=list)
    nonfinite_outputs: list[NonFiniteOutput] = field(default_factory=list)
    norm_outliers: list[NormOutlier] = field(default_factory=list)
    # every checked tensor: (name, output norm, ((model label, norm) per parent))
    norms: list[tuple[str, float, tuple[tuple[str, float], ...]]] = field(default_factory=list)
    _labels: tuple[str, ...] = ()

    @staticmethod
    def for_plan(plan: MergePlan, allow_nonfinite: bool = False) -> HealthReport:
        return HealthReport(
            plan.method.name,
            plan.random_seed if plan.method.random else None,
            allow_nonfinite,
            _labels=tuple(m.label for m in plan.models),
        )

    # ------------------------------------------------------------------ recording
    def record(self, job: TensorJob, figures: JobFigures) -> None:
        """Take one job's figures; ``NonFiniteError`` if its output is not finite and that is not
        allowed (the job is then not counted as written)."""
        out = figures.output
        reached = out is not None and out.nonfinite > 0
        bad = tuple(
            NonFiniteInput(job.out_name, self._labels[src.model], src.tensor, f.nonfinite, reached)
            for src, f in zip(job.inputs, figures.inputs)
            if f is not None and f.nonfinite > 0
        )
        if out is not None and reached:
            entry = NonFiniteOutput(job.out_name, out.nonfinite, out.numel, bad)
            if not self.allow_nonfinite:
                raise NonFiniteError(job.out_name, tuple(i.model for i in bad), _refusal(entry, job.out_dtype))
            self.nonfinite_outputs.append(entry)
        self.nonfinite_inputs.extend(bad)
        self.tensors_written += 1
        if out is None:
            return
        self.tensors_checked += 1
        parents = [(self._labels[s.model], f) for s, f in zip(job.inputs, figures.inputs) if f is not None]
        self.norms.append((job.out_name, out.norm, tuple((label, f.norm) for label, f in parents)))
        outlier = _norm_outlier(job.out_name, out, parents)
        if outlier is not None:
            self.norm_outliers.append(outlier)

    # ------------------------------------------------------------------ reading
    @property
    def warnings(self) -> list[str]:
        """One line per problem (non-finite inputs that did not reach the output, non-finite
        outputs written with ``allow_nonfinite``, norms far from every parent's), at most
        ``SHOWN`` per kind."""
        lines: list[str] = []
        dropped = [i for i in self.nonfinite_inputs if not i.reached_output]
        lines += _capped(
            [
                f"tensor '{i.tensor}': input {i.model} has {_nan_values(i.count)} in '{i.source}'; "
                f"the merge did not carry {_it(i.count)} into the output"
                for i in dropped
            ]
        )
        lines += _capped(
            [
                f"tensor '{o.tensor}' was written with {_nan_values(o.count)} of {o.numel} (--allow-nonfinite)"
                + (f"; non-finite inputs: {_models(o.inputs)}" if o.inputs else "; every input was finite")
                for o in self.nonfinite_outputs
            ]
        )
        lines += _capped(
            [
                f"tensor '{o.tensor}': output norm {o.output_norm:.4g} is {o.ratio:.3g}x its "
                + ("largest" if o.ratio > 1 else "smallest")
                + " parent's ("
                + ", ".join(f"{label} {norm:.4g}" for label, norm in o.parents)
                + "): check the merge parameters"
                for o in self.norm_outliers
            ]
        )
        return lines

    def summary_lines(self) -> list[str]:
        """The end-of-merge summary: one line of totals, then the ``warnings``."""
        parts = [_tensors(self.tensors_written)]
        outputs = len(self.nonfinite_outputs)
        inputs = len({(i.model, i.source) for i in self.nonfinite_inputs})
        parts.append(
            "no NaN/Inf"
            if not outputs and not inputs
            else f"NaN/Inf in {inputs} input tensor(s), "
            + (f"{outputs} written (--allow-nonfinite)" if outputs else "none written")
        )
        parts.append(
            f"{len(self.norm_outliers)} norms far from every parent's" if self.norm_outliers else "norms in range"
        )
        if self.random_seed is not None:
            parts.append(f"random seed {self.random_seed}")
        return ["health: " + ", ".join(parts), *self.warnings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "random_seed": self.random_seed,
            "allow_nonfinite": self.allow_nonfinite,
            "tensors_written": self.tensors_written,
            "tensors_checked": self.tensors_checked,
            "nonfinite_inputs": [
                {
                    "tensor": i.tensor,
                    "model": i.model,
                    "source": i.source,
                    "count": i.count,
                    "reached_output": i.reached_output,
                }
                for i in self.nonfinite_inputs
            ],  # fmt: skip
            "nonfinite_outputs": [
                {"tensor": o.tensor, "count": o.count, "numel": o.numel, "models": [i.model for i in o.inputs]}
                for o in self.nonfinite_outputs
            ],
            "norm_outliers": [
                {
                    "tensor": o.tensor,
                    "output_norm": _number(o.output_norm),
                    "ratio": _number(o.ratio),
                    "parents": [{"model": label, "norm": _number(norm)} for label, norm in o.parents],
                }
                for o in self.norm_outliers
            ],
            "norm_ratio_threshold": NORM_RATIO,
            "tensors": [
                {
                    "name": name,
                    "output_norm": _number(norm),
                    "parents": [{"model": label, "norm": _number(n)} for label, n in parents],
                }
                for name, norm, parents in self.norms
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def _norm_outlier(name: str, out: Figures, parents: list[tuple[str, Figures]]) -> NormOutlier | None:
    """The outlier entry when ``out`` is far from every parent (see NORM_RATIO), else None."""
    if not parents or out.nonfinite or not all(math.isfinite(f.sumsq) for _, f in parents):
        return None
    if not math.isfinite(out.sumsq):
        return None
    largest = max(f.rms for _, f in parents)
    smallest = min(f.rms for _, f in parents)
    shown = tuple((label, f.norm) for label, f in parents)
    if out.rms > NORM_RATIO * largest and out.rms >= TINY_RMS:
        return NormOutlier(name, out.norm, shown, out.rms / largest if largest else math.inf)
    if smallest >= TINY_RMS and out.rms * NORM_RATIO < smallest:
        return NormOutlier(name, out.norm, shown, out.rms / smallest)
    return None


def _refusal(entry: NonFiniteOutput, out_dtype: str) -> str:
    why = (
        f"non-finite inputs: {_models(entry.inputs)}"
        if entry.inputs
        else f"every input is finite, so the arithmetic produced them (an overflow of {dtype_text(out_dtype)}, or a division by zero)"
    )
    return (
        f"tensor '{entry.tensor}': {entry.count} of its {entry.numel} merged values are NaN or Inf; {why}. "
        "No model was written; pass --allow-nonfinite (allow_nonfinite=True) to write it anyway"
    )


def _nan_values(n: int) -> str:
    return f"{n} NaN/Inf value" if n == 1 else f"{n} NaN/Inf values"


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _it(n: int) -> str:
    return "it" if n == 1 else "them"


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= SHOWN:
        return lines
    return [*lines[:SHOWN], f"... and {len(lines) - SHOWN} more like these (--json writes them all)"]
