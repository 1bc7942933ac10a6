"""Every merge method, listed explicitly. Adding a method is one file plus one line here."""

from __future__ import annotations

from .arcee_fusion import METHOD as _arcee_fusion
from .base import MergeMethod
from .breadcrumbs import BREADCRUMBS as _breadcrumbs
from .breadcrumbs import BREADCRUMBS_TIES as _breadcrumbs_ties
from .dare import DARE_LINEAR as _dare_linear
from .dare import DARE_TIES as _dare_ties
from .della import DELLA as _della
from .della import DELLA_LINEAR as _della_linear
from .karcher import METHOD as _karcher
from .linear import METHOD as _linear
from .model_stock import METHOD as _model_stock
from .multislerp import METHOD as _multislerp
from .nearswap import METHOD as _nearswap
from .passthrough import METHOD as _passthrough
from .sce import METHOD as _sce
from .slerp import METHOD as _slerp
from .task_arithmetic import METHOD as _task_arithmetic
from .ties import METHOD as _ties

_ALL: tuple[MergeMethod, ...] = (
    _linear,
    _task_arithmetic,
    _ties,
    _dare_ties,
    _dare_linear,
    _breadcrumbs,
    _breadcrumbs_ties,
    _della,
    _della_linear,
    _passthrough,
    _slerp,
    _multislerp,
    _karcher,
    _model_stock,
    _sce,
    _nearswap,
    _arcee_fusion,
)

METHODS: dict[str, MergeMethod] = {}
for _m in _ALL:
    METHODS[_m.name] = _m
    for _alias in _m.aliases:
        METHODS[_alias] = _m


def method_names() -> list[str]:
    """Every name accepted as ``merge_method`` (aliases included), sorted."""
    return sorted(METHODS)


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; KeyError if there is none."""
    return METHODS[name]


def all_methods() -> tuple[MergeMethod, ...]:
    """Each method once, in table order."""
    return _ALL
