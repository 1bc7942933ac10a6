"""Where this tool deliberately merges a config differently from mergekit 0.1.5, and which of
those differences a given config touches.

The README section "Differences from mergekit and mergekitty" lists the same entries; a merge
whose config touches one says so in one line, and ``-v`` explains each (``cli/run.py``). Pure:
reads the config only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import ConditionalParameter, MergeConfiguration, parameter_blocks

__all__ = ["Difference", "touched_differences"]


@dataclass(frozen=True)
class Difference:
    name: str  # a few words, for the one-line note
    detail: str  # what differs and the option that gives the other behaviour, if any


FLOAT32 = Difference(
    "float32 arithmetic",
    "every method computes in float32 and rounds once to the output dtype; mergekit computes in the config's "
    "'dtype' (or, without one, in the models' stored dtype: bfloat16 arithmetic for bfloat16 checkpoints), so "
    "its results differ by that rounding. No option.",
)
THRESHOLD_TIES = Difference(
    "ties at the sparsification threshold",
    "magnitude sparsification (TIES, Breadcrumbs) keeps every element tied with the k-th largest magnitude; "
    "mergekit keeps exactly k, choosing among equal magnitudes arbitrarily. No option.",
)
HEAD_GRADIENT = Difference(
    "the head's gradient value",
    "a gradient (a list of values) is evaluated at its last value for the tensors after the layers (final "
    "norm, lm_head), as mergekitty 0.x did; mergekit 0.1.5 evaluates it at its first value there. To "
    "get either, give those tensors their own value with a filter, e.g. {filter: lm_head, value: 0.5}.",
)
ROW_WISE = Difference(
    "nuslerp_row_wise",
    "nuslerp_row_wise: true interpolates each row, as its name says; mergekit's interpolates each column. "
    "Flip the flag to get mergekit's result.",
)
RESCALE = Difference(
    "DARE/DELLA rescaling",
    "the kept task-vector values are divided by their keep probability (density for DARE, each value's p for "
    "DELLA), as the papers do; mergekit rescales to keep the L1 norm. rescale_l1: true gives mergekit's.",
)

RANDOM_DRAWS = Difference(
    "random draws",
    "DARE and DELLA draw their masks from a counter-based generator (the same random_seed gives the same model "
    "on any device and thread count); mergekit draws from torch's generator, so the same seed keeps different "
    "elements. No option.",
)
SCE_WEIGHTS = Difference(
    "SCE weights of small task vectors",
    "SCE falls back to uniform weights only when every task vector's energy is exactly 0; mergekit does below "
    "1e-6, which includes typical fine-tunes (mean squared change ~1e-6), so its weights are often uniform "
    "where these follow the energies. No option.",
)
ARCEE_QUANTILES = Difference(
    "arcee_fusion's threshold",
    "arcee_fusion takes exact quantiles of every element and the KL in float64; mergekit estimates the "
    "quantiles from a random sample above 1e6 elements and computes the KL in the input dtype, so elements "
    "near the threshold can be chosen differently. No option.",
)


def _settings(config: MergeConfiguration) -> Iterator[tuple[str, Any]]:
    """(parameter name, setting) of every parameters block."""
    for _, block in parameter_blocks(config):
        yield from block.items()


def _values(setting: Any) -> Iterator[Any]:
    if isinstance(setting, ConditionalParameter):
        yield setting.value
    elif isinstance(setting, list) and setting and isinstance(setting[0], ConditionalParameter):
        for c in setting:
            yield c.value
    else:
        yield setting


def _set(config: MergeConfiguration, name: str, value: Any) -> bool:
    return any(n == name and any(v == value for v in _values(s)) for n, s in _settings(config))


def touched_differences(config: MergeConfiguration) -> list[Difference]:
    """The documented differences that change this config's result, in README order."""
    method = config.merge_method
    out = []
    if config.dtype in ("bfloat16", "float16"):
        out.append(FLOAT32)
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties") and any(
        n in ("density", "gamma") for n, _ in _settings(config)
    ):
        out.append(THRESHOLD_TIES)
    if any(isinstance(v, list) and len(v) > 1 for _, s in _settings(config) for v in _values(s)):
        out.append(HEAD_GRADIENT)
    if method in ("slerp", "nuslerp") and _set(config, "nuslerp_flatten", False):
        out.append(ROW_WISE)
    if method in ("dare_ties", "dare_linear", "della", "della_linear") and not _set(config, "rescale_l1", True):
        if not _set(config, "rescale", False):
            out.append(RESCALE)
    if method in ("dare_ties", "dare_linear", "della", "della_linear"):
        out.append(RANDOM_DRAWS)
    if method == "sce":
        out.append(SCE_WEIGHTS)
    if method == "arcee_fusion":
        out.append(ARCEE_QUANTILES)
    return out
