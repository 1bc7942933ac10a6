"""A MergePlan as plain JSON and back, so that another process or machine can execute it.

Values are written as JSON where JSON has them. Tuples, paths, numpy arrays, the plan's own
frozen dataclasses and the merge method (by its registry name) are tagged objects; only the
classes listed in ``_TYPES`` are rebuilt, so a plan file can name no other code to run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import PlanError


def _types() -> dict[str, type]:
    from . import kernels, plan
    from .tokenizer import build, vocab

    classes: list[type] = [
        plan.MergePlan,
        plan.Excluded,
        plan.PlannedModel,
        plan.TensorJob,
        plan.Source,
        kernels.Copy,
        kernels.CopyIfEqual,
        kernels.LinearCombination,
        kernels.Gta,
        kernels.MethodKernel,
        kernels.Torch,
        kernels.GtaSpec,
        kernels.Sparsity,
        build.VocabPlan,
        build.VocabDiff,
        vocab.AddedToken,
    ]
    return {c.__name__: c for c in classes}


def _encode(value: Any) -> Any:
    from .methods.base import MergeMethod

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, MergeMethod):
        return {"__method__": value.name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    import numpy as np

    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    raise PlanError(f"cannot write a {type(value).__name__} into a plan file")


def _decode(value: Any, types: dict[str, type]) -> Any:
    if isinstance(value, list):
        return [_decode(v, types) for v in value]
    if not isinstance(value, dict):
        return value
    if "__type__" in value:
        cls = types.get(value["__type__"])
        if cls is None:
            raise PlanError(f"a plan file names an unknown type {value['__type__']!r}")
        return cls(**{k: _decode(v, types) for k, v in value.items() if k != "__type__"})
    if "__method__" in value:
        from .methods.registry import get_method

        return get_method(value["__method__"])
    if "__tuple__" in value:
        return tuple(_decode(v, types) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, types) for k, v in value["__dict__"].items()}
    if "__items__" in value:
        return {_decode(k, types): _decode(v, types) for k, v in value["__items__"]}
    if "__path__" in value:
        return Path(value["__path__"])
    if "__ndarray__" in value:
        import numpy as np

        return np.array(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
    raise PlanError(f"a plan file holds an untagged object with keys {sorted(value)[:5]}")


def dumps(plan: Any) -> str:
    return json.dumps(_encode(plan))


def loads(text: str) -> Any:
    from .io.model_files import nesting_exceeds
    from .limits import MAX_NESTING

    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise PlanError(f"a plan file is not JSON: {str(exc) or 'nested too deeply'}") from None
    if isinstance(data, (dict, list)) and nesting_exceeds(data, MAX_NESTING):
        raise PlanError(f"a plan file nests more than {MAX_NESTING} levels deep")
    try:
        return _decode(data, _types())
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise PlanError(f"a plan file does not describe a plan: {exc}") from None
