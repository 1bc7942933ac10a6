"""A recipe stage read as a model, without writing it: ``StageCheckpoint`` has the interface of
``io.checkpoint.Checkpoint``, and computes each tensor when a later stage reads it by running the
stage plan's job for it, with the kernel that plan chose, into the stage's output dtype. The
bytes are those the intermediate model's file would hold, so a fused recipe equals the same
merges run one after another; nothing is written, and a tensor no later stage reads is never
computed."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MergekittyError
from ..io.checkpoint import TensorInfo

if TYPE_CHECKING:
    import torch

    from ..plan import MergePlan, TensorJob

__all__ = ["Stage", "StageCheckpoint"]


@dataclass(frozen=True)
class Stage:
    """A planned stage that later stages read: its plan, and the directory holding its side files
    (config.json, tokenizer, layout), written before any weight is read."""

    name: str
    plan: MergePlan
    directory: Path


class StageCheckpoint:
    """The tensors of a stage's output, computed on demand (see the module docstring). A tensor
    computed for a job is kept until the job releases it."""

    files = None  # as Checkpoint's: the weight files it reads (none: it is computed)

    def __init__(
        self,
        plan: MergePlan,
        directory: Path,
        label: str,
        threads: int = 0,
        allow_nonfinite: bool = False,
    ) -> None:
        from ..health import HealthReport

        self.plan = plan
        self.directory = Path(directory)
        self.label = label
        self.threads = threads  # the stage's jobs run on the device its plan was made for
        self._jobs = {j.out_name: j for j in plan.jobs}
        self.infos = {
            j.out_name: TensorInfo(j.out_name, j.out_dtype, tuple(j.shape), j.shard, j.offset, j.output_bytes)
            for j in plan.jobs
        }
        self._opened: list[Any] | None = None
        self._computed: dict[str, Any] = {}
        # the stage's own health checks: a non-finite intermediate tensor is refused as its merge would refuse it
        self._report = HealthReport.for_plan(plan, allow_nonfinite)

    def _inputs(self) -> list[Any]:
        if self._opened is None:
            self._opened = [
                m.open(self.plan.device, self.threads, self._report.allow_nonfinite) for m in self.plan.models
            ]
        return self._opened

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self.plan.out_config)

    def mapped(self, name: str) -> bool:
        """Every tensor of a stage is bytes the native kernels can read."""
        return name in self.infos

    def read_bytes(self, name: str) -> int:
        """What computing ``name`` reads from the stage's inputs (the planner counts these)."""
        return int(self._jobs[name].input_bytes)

    def view(self, name: str) -> Any:
        """The tensor's bytes, in its dtype, computed now unless a job holds them already."""
        data = self._computed.get(name)
        if data is None:
            data = self._compute(self._jobs[name])
            self._computed[name] = data
        return data

    def _compute(self, job: TensorJob) -> Any:
        from ..errors import MergeError
        from ..execute import BufferPool, compute

        opened = self._inputs()
        try:
            data, _, _ = compute(self.plan, opened, job, self.threads, BufferPool(keep=0), self._report)
        except MergekittyError as exc:
            raise MergeError(f"stage '{self.label}': {exc}") from exc
        for s in (*job.inputs, *job.row_sources):
            opened[s.model].release(s.tensor)
        return data

    def tensor(self, name: str) -> torch.Tensor:
        import warnings

        import torch

        from ..io.dtypes import torch_dtype

        info = self.infos[name]
        dtype = torch_dtype(info.dtype)
        assert dtype is not None, "a stage writes float tensors or copies"
        with warnings.catch_warnings():  # a map view is read-only; the methods never write inputs
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(memoryview(self.view(name)), dtype=torch.uint8)
        return flat.view(dtype).reshape(info.shape)

    def prefetch(self, name: str) -> None:
        job = self._jobs[name]
        opened = self._inputs()
        for s in (*job.inputs, *job.row_sources):
            opened[s.model].prefetch(s.tensor)

    def release(self, name: str) -> None:
        self._computed.pop(name, None)

    def check_intact(self, names: Iterable[str] | None = None) -> None:
        """``Checkpoint.check_intact`` of the stage's inputs the tensors ``names`` (every tensor
        when None) are computed from."""
        from ..execute import check_inputs

        if self._opened is None:
            return
        if names is None:
            check_inputs(self._opened)
            return
        for name in names:
            check_inputs(self._opened, self._jobs[name])
