"""Stream the models tensor by tensor, as a merge reads them, through the native figures kernel.

Each tensor of the base that every model has, with the same shape, is read zero-copy from the
memory maps and handed with the models' to ``_native.task_vector_stats`` in one call; the raw
sums go to its cell (``modules.Grid``). Nothing bigger than one float32 copy of the largest
tensor (the kernel's scratch) is ever allocated, and torch is not imported (except to read
``pytorch_model*.bin`` checkpoints, which only torch can).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, ModelFormatError, PlanError
from ..io.dtypes import NATIVE_FLOAT_CODES
from ..text import shape_text
from .figures import CellSums, Inspection
from .modules import Grid

log = logging.getLogger(__name__)

__all__ = ["OpenModel", "check_distinct", "grid_of", "inspect_models", "open_model"]

# how many skipped tensors a warning names
SHOWN = 5


@dataclass
class OpenModel:
    label: str
    path: Path
    checkpoint: Any  # io.checkpoint.Checkpoint


def open_model(reference: str, cache_dir: str | None = None) -> OpenModel:
    """Open the model ``reference`` (a directory or hub id, ``@revision`` allowed) for reading."""
    from ..io.checkpoint import Checkpoint
    from ..refs import ModelReference, resolve_local_path

    ref = ModelReference.parse(reference)
    if ref.lora is not None:
        raise InvalidArgumentError(
            f"{reference}: inspect reads the weights as stored; merge the LoRA adapter first (mergekitty merge-lora)"
        )
    path = Path(resolve_local_path(ref.path, ref.revision, cache_dir))
    return OpenModel(str(ref), path, Checkpoint(path, label=str(ref)))


def grid_of(model: OpenModel) -> Grid:
    """The rows of ``model``'s layout (its config.json, or its mergekitty_layout.json)."""
    from ..architecture import infer_layout, model_layout_override

    checkpoint = model.checkpoint
    try:
        cfg = checkpoint.config()
    except ModelFormatError:
        if (model.path / "config.json").exists():
            raise
        cfg = {}  # no config.json: the layer stack is inferred from the tensor names alone
    layout = infer_layout(checkpoint.names(), cfg, where=model.label, override=model_layout_override(model.path))
    return Grid(layout)


def _buffer(checkpoint: Any, name: str) -> Any:
    """The tensor's bytes: a zero-copy view of the mapped file, or (a .bin checkpoint) torch's."""
    view = checkpoint.view(name)
    if view is not None:
        return view
    import torch  # only torch reads pickled checkpoints

    return checkpoint.tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy()


def _common_tensors(base: OpenModel, models: Sequence[OpenModel], skipped: dict[str, str]) -> list[str]:
    """The base's tensors that every model has with the same shape, as floats the kernel reads,
    in the base's file order (sequential reads); the others go to ``skipped`` with the reason."""
    infos = base.checkpoint.infos
    names = sorted(infos, key=lambda n: (infos[n].file, infos[n].start))
    out = []
    for name in names:
        info = infos[name]
        missing = [m.label for m in models if name not in m.checkpoint]
        if missing:
            skipped[name] = f"not in {', '.join(missing)}"
            continue
        others = [m.checkpoint.infos[name] for m in models]
        odd = next((m for m, o in zip(models, others) if o.shape != info.shape), None)
        if odd is not None:
            shape = odd.checkpoint.infos[name].shape
            skipped[name] = f"shape {shape_text(shape)} in {odd.label}, {shape_text(info.shape)} in {base.label}"
            log.warning("tensor '%s' is left out: %s", name, skipped[name])
            continue
        dtypes = {info.dtype, *(o.dtype for o in others)}
        if not dtypes <= NATIVE_FLOAT_CODES:
            skipped[name] = f"dtype {'/'.join(sorted(dtypes))} (only F32, F16 and BF16 are compared)"
            continue
        out.append(name)
    missing_any = [n for n, why in skipped.items() if why.startswith("not in ")]
    if missing_any:
        log.warning(
            "%d tensor(s) of %s are not in every model and are left out: %s%s",
            len(missing_any),
            base.label,
            ", ".join(missing_any[:SHOWN]),
            ", ..." if len(missing_any) > SHOWN else "",
        )
    other = [n for n, why in skipped.items() if why.startswith("dtype ")]
    if other:
        log.info("%d tensor(s) that are not floats are left out: %s", len(other), ", ".join(other[:SHOWN]))
    return out


def inspect_models(
    base: OpenModel,
    models: Sequence[OpenModel],
    density: float = 0.5,
    threads: int = 0,
    grid: Grid | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> Inspection:
    """The figures of ``models`` against ``base``. ``on_tensor(name, bytes_read)`` is called after
    each tensor (a progress bar)."""
    import numpy as np

    from .. import _native

    if not models:
        raise InvalidArgumentError("inspect needs at least one model besides the base")
    if not 0 < density <= 1:
        raise InvalidArgumentError(f"--density must be in (0, 1], got {density}")
    grid = grid or grid_of(base)
    skipped: dict[str, str] = {}
    names = _common_tensors(base, models, skipped)
    if not names:
        labels = ", ".join(m.label for m in (base, *models))
        raise PlanError(f"the models have no tensor in common to compare ({labels})")
    numel = {n: math.prod(base.checkpoint.infos[n].shape) for n in names}
    # one float32 task vector of the largest tensor: the kernel's TIES threshold needs it whole
    scratch: Any = np.empty(max(numel.values()), dtype=np.float32)  # a writable buffer
    cells: dict[tuple[str, str], CellSums] = {}
    everyone = (base, *models)
    for k, name in enumerate(names):
        if k + 1 < len(names):
            for m in everyone:
                m.checkpoint.prefetch(names[k + 1])
        buffers = [_buffer(m.checkpoint, name) for m in everyone]
        figures = _native.task_vector_stats(
            buffers[0],
            base.checkpoint.infos[name].dtype,
            buffers[1:],
            [m.checkpoint.infos[name].dtype for m in models],
            density,
            scratch,
            threads,
        )
        del buffers
        place = grid.place(name)
        cell = cells.get((place.row, place.kind))
        if cell is None:
            cell = cells[(place.row, place.kind)] = CellSums(len(models))
        cell.add_tensor(figures)
        for m in everyone:
            m.checkpoint.release(name)
        if on_tensor is not None:
            on_tensor(name, sum(m.checkpoint.infos[name].nbytes for m in everyone))
    inspection = Inspection(base.label, tuple(m.label for m in models), density, cells, skipped)
    _warn_nonfinite(inspection)
    return inspection


def _warn_nonfinite(inspection: Inspection) -> None:
    total = inspection.total()
    for label, count in zip(inspection.models, total.nonfinite):
        if count:
            log.warning("%s: %d element(s) differ from the base by NaN or Inf; they count as 0", label, count)


def check_distinct(base: OpenModel, models: Sequence[OpenModel]) -> list[OpenModel]:
    """``models`` without the base (a model given as both is compared with nothing)."""
    out = [m for m in models if m.path.resolve() != base.path.resolve()]
    if len(out) < len(models):
        log.warning("%s is the base; it is not compared with itself", base.label)
    if not out:
        raise InvalidArgumentError("inspect needs at least one model besides the base")
    return out
