"""Layer shuffle: a ``passthrough`` config whose layers are drawn at random from several models.

Pure: models, their layer counts, weights and a seed give the config, and the same inputs give
the same config. Two ways to draw:

- by position (the default): output layer ``i`` is layer ``i`` of a model chosen at random,
  with probability proportional to its weight, among the models that have a layer ``i``; the
  output has as many layers as the first model;
- full random: each model gives ``int(layers * weight)`` layers, each drawn at random (with
  replacement) from all of its layers, and the whole list is shuffled.

Consecutive picks that continue each other (the same model, layer ``j`` then ``j + 1``) become
one slice, so every slice of the config is as long as it can be.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["Run", "check_weights", "draw_layers", "join_runs", "shuffle_config", "shuffle_yaml"]

# far more layers than any model stacks; a weight typed with a few digits too many stops here
# instead of drawing millions of picks
MAX_DRAWN_LAYERS = 10_000


@dataclass(frozen=True)
class Run:
    """Layers ``[start, stop)`` of model ``model`` (an index into the models), in order."""

    model: int
    start: int
    stop: int


def check_weights(models: Sequence[str], weights: Sequence[float]) -> list[float]:
    """One finite weight >= 0 per model, not all 0; no weights at all means equal weights."""
    if not models:
        raise InvalidArgumentError("no models: give at least one with -m/--model")
    if not weights:
        return [1.0] * len(models)
    if len(weights) != len(models):
        raise InvalidArgumentError(
            f"{len(weights)} -w/--weight value(s) for {len(models)} -m/--model model(s): "
            "give one weight per model, in the same order (or none, for equal weights)"
        )
    for model, weight in zip(models, weights):
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgumentError(f"-w/--weight {weight} of model {model}: a weight must be a number >= 0")
    if not any(weights):
        raise InvalidArgumentError("every -w/--weight is 0: at least one model needs a positive weight")
    return [float(w) for w in weights]


def draw_layers(
    layer_counts: Sequence[int], weights: Sequence[float], rng: random.Random, full_random: bool = False
) -> list[tuple[int, int]]:
    """The output layers as (model index, source layer) pairs, drawn with ``rng``."""
    if full_random:
        drawn = sum(int(count * weight) for count, weight in zip(layer_counts, weights))
        if drawn > MAX_DRAWN_LAYERS:
            raise InvalidArgumentError(
                f"--full-random would draw {drawn} layers (int(layers x weight) per model); at most "
                f"{MAX_DRAWN_LAYERS}: lower the weights"
            )
        picks = [
            (model, rng.randrange(count))
            for model, (count, weight) in enumerate(zip(layer_counts, weights))
            for _ in range(int(count * weight))
        ]
        if not picks:
            raise InvalidArgumentError(
                "--full-random draws no layer: int(layers x weight) is 0 for every model (raise the weights)"
            )
        rng.shuffle(picks)
        return picks
    picks = []
    for layer in range(layer_counts[0]):
        having = [m for m, count in enumerate(layer_counts) if count > layer and weights[m] > 0]
        if not having:
            raise InvalidArgumentError(
                f"layer {layer}: no model with a positive weight has that many layers "
                f"(the output takes its {layer_counts[0]} layers from the first model)"
            )
        # choices() over the candidates' own weights: one draw of rng.random() per layer
        (model,) = rng.choices(having, weights=[weights[m] for m in having])
        picks.append((model, layer))
    return picks


def join_runs(picks: Sequence[tuple[int, int]]) -> list[Run]:
    """``picks`` as runs: a pick that continues the previous one (same model, next layer)
    extends it, so no two neighbouring runs could be joined."""
    runs: list[Run] = []
    for model, layer in picks:
        last = runs[-1] if runs else None
        if last is not None and last.model == model and last.stop == layer:
            runs[-1] = Run(model, last.start, layer + 1)
        else:
            runs.append(Run(model, layer, layer + 1))
    return runs


def shuffle_config(
    models: Sequence[str],
    layer_counts: Sequence[int],
    weights: Sequence[float],
    seed: int,
    full_random: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The passthrough config (as plain data) of a layer shuffle of ``models``, whose layer
    counts are ``layer_counts``, drawn from ``random.Random(seed)``."""
    if len(layer_counts) != len(models):
        raise InvalidArgumentError(f"{len(layer_counts)} layer counts for {len(models)} models")
    weights = check_weights(models, weights)
    for model, count in zip(models, layer_counts):
        if count < 1:
            raise InvalidArgumentError(f"model {model} has no layers to shuffle")
    runs = join_runs(draw_layers(layer_counts, weights, random.Random(seed), full_random))
    config: dict[str, Any] = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": models[r.model], "layer_range": [r.start, r.stop]}]} for r in runs],
    }
    if dtype is not None:
        config["dtype"] = dtype
    return config


def shuffle_yaml(config: dict[str, Any], seed: int, full_random: bool = False) -> str:
    """``config`` as YAML text, headed by a comment with the seed that reproduces it."""
    import yaml

    mode = "--full-random" if full_random else "by position"
    header = (
        f"# layer shuffle ({mode}), random seed {seed}: the same models, weights and --random-seed {seed} "
        "give this config again\n"
    )
    # default_flow_style=None: the innermost lists (layer_range) on one line, [start, stop]
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
