"""Parameter evaluation: gradients, filters, fall-through and precedence."""

from __future__ import annotations

import math

import pytest

from mergekitty.config import ConditionalParameter, load_config
from mergekitty.params import (
    ParameterResolver,
    evaluate,
    filter_matches,
    interpolate_gradient,
    layer_t,
    normalize_to_slices,
)
from mergekitty.refs import ModelReference


def test_scalars_returned_as_is():
    assert evaluate(0.5, "x", 0.3) == 0.5
    assert evaluate(3, "x", 0.3) == 3 and isinstance(evaluate(3, "x", 0.3), int)
    assert evaluate(True, "x", 0.3) is True
    assert evaluate(False, "x", 0.9) is False
    assert evaluate(None, "x", 0.5) is None


def test_layer_t():
    assert layer_t(0, 40) == 0.0
    assert layer_t(39, 40) == 1.0
    assert layer_t(10, 40) == 10 / 39
    assert layer_t(0, 1) == 1.0  # one-layer slices sit at the end of the gradient
    assert layer_t(1, 3) == 0.5


def test_worked_example_from_spec():
    knots = [0, 0.5, 0.3, 0.7, 1]
    # independent computation: t = 10/39, position 4*t between knots 1 and 2
    t = 10 / 39
    pos = 4 * t
    frac = pos - 1
    expected = 0.5 + frac * (0.3 - 0.5)
    value = evaluate(knots, "model.layers.10.mlp.up_proj.weight", layer_t(10, 40))
    assert value == pytest.approx(expected, abs=1e-12)
    assert value == pytest.approx(0.4949, abs=1e-4)


def test_gradient_endpoints_and_knots():
    g = [0.0, 1.0, 0.0]
    assert interpolate_gradient(g, 0.0) == 0.0
    assert interpolate_gradient(g, 0.5) == 1.0
    assert interpolate_gradient(g, 1.0) == 0.0
    assert interpolate_gradient(g, 0.25) == pytest.approx(0.5)
    assert interpolate_gradient([7], 0.3) == 7
    # every layer of a 5-layer slice over a 5-knot gradient hits a knot exactly
    knots = [0.1, 0.9, 0.2, 0.8, 0.3]
    assert [evaluate(knots, "w", layer_t(i, 5)) for i in range(5)] == pytest.approx(knots)


def test_filters_first_match_wins():
    setting = [
        ConditionalParameter(value=0.1, filter="self_attn"),
        ConditionalParameter(value=0.2, filter="mlp"),
        ConditionalParameter(value=0.3, filter="layers.1"),
        ConditionalParameter(value=0.9),
    ]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0) == 0.2
    assert evaluate(setting, "model.layers.1.input_layernorm.weight", 0) == 0.3
    assert evaluate(setting, "model.norm.weight", 0) == 0.9


def test_star_filter_and_gradient_inside_conditional():
    setting = [ConditionalParameter(value=[0.0, 1.0], filter="*")]
    assert evaluate(setting, "anything", 0.25) == pytest.approx(0.25)
    assert filter_matches("*", "x") and filter_matches(None, "x")
    assert not filter_matches("mlp", "model.norm.weight")


def test_no_match_falls_through_to_none():
    setting = [ConditionalParameter(value=0.1, filter="self_attn")]
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) is None


def test_bare_conditional_works():
    assert evaluate(ConditionalParameter(value=0.4, filter="mlp"), "layers.0.mlp.w", 0) == 0.4
    assert evaluate(ConditionalParameter(value=0.4, filter="mlp"), "layers.0.attn.w", 0) is None
    assert evaluate(ConditionalParameter(value=[0, 1]), "x", 0.5) == pytest.approx(0.5)


SLICES = """
merge_method: linear
parameters:
  weight: 0.1
  t: [{filter: self_attn, value: 0.11}]
  normalize: true
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
        parameters:
          weight: [{filter: mlp, value: 0.9}]
      - model: b
        layer_range: [0, 4]
    parameters:
      weight: 0.5
      t: [0.0, 1.0]
  - sources:
      - model: a
        layer_range: [4, 8]
      - model: b
        layer_range: [4, 8]
        parameters:
          weight: 0.7
"""


def test_precedence_slices():
    r = ParameterResolver(load_config(SLICES))
    # level 1: source parameters (per-model only), with the input name
    assert r.model_value("weight", 0, 0, "model.layers.2.mlp.up_proj.weight", 0.5) == 0.9
    # the source's filter misses -> falls through to the output slice
    assert r.model_value("weight", 0, 0, "model.layers.2.self_attn.q_proj.weight", 0.5) == 0.5
    # source b has no parameters -> output slice
    assert r.model_value("weight", 0, 1, "model.layers.2.mlp.up_proj.weight", 0.5) == 0.5
    # second slice: source b has its own, source a falls through to the top level
    assert r.model_value("weight", 1, 1, "w", 0.0) == 0.7
    assert r.model_value("weight", 1, 0, "w", 0.0) == 0.1
    # global parameters never look at sources
    assert r.global_value("weight", 0, "model.layers.2.mlp.up_proj.weight", 0.5) == 0.5
    assert r.global_value("weight", 1, "w", 0.5) == 0.1
    # slice-level gradient, and the top level as fallback for the second slice
    assert r.global_value("t", 0, "x", 0.25) == pytest.approx(0.25)
    assert r.global_value("t", 1, "model.layers.5.self_attn.o_proj.weight", 0.25) == 0.11
    assert r.global_value("t", 1, "model.layers.5.mlp.down_proj.weight", 0.25) is None
    assert r.global_value("normalize", 0, "x", 0) is True
    # unset anywhere
    assert r.global_value("density", 0, "x", 0) is None
    assert r.model_value("density", 1, 1, "x", 0) is None


def test_global_uses_output_name_model_uses_input_name():
    cfg = load_config(
        """
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [3, 4]
        parameters:
          scale: [{filter: layers.3., value: 2.0}]
parameters:
  scale: [{filter: layers.3., value: 9.0}]
"""
    )
    r = ParameterResolver(cfg)
    # input layer 3 becomes output layer 0
    assert r.model_value("scale", 0, 0, "model.layers.3.mlp.w", 1.0) == 2.0
    assert r.global_value("scale", 0, "model.layers.0.mlp.w", 1.0) is None
    assert r.global_value("scale", 0, "model.layers.3.mlp.w", 1.0) == 9.0


MODELS = """
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 0.3, density: [0.2, 0.8]}
  - model: b
parameters:
  weight: 1.0
"""


def test_precedence_models_config():
    r = ParameterResolver(load_config(MODELS))
    assert r.model_value("weight", 0, 0, "w", 0.0) == 0.3
    assert r.model_value("weight", 0, 1, "w", 0.0) == 1.0
    assert r.model_value("weight", 0, 2, "w", 0.0) == 1.0  # the appended base: top level only
    assert r.model_value("density", 0, 0, "w", 0.5) == pytest.approx(0.5)
    assert r.model_value("density", 0, 1, "w", 0.5) is None


def test_gradient_restarts_per_slice():
    cfg = load_config(
        """
merge_method: linear
parameters:
  weight: [0.0, 1.0]
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources: [{model: a, layer_range: [3, 6]}]
  - sources: [{model: a, layer_range: [6, 7]}]
"""
    )
    r = ParameterResolver(cfg)
    values = []
    for si, sl in enumerate(cfg.slices):
        start, stop = sl.sources[0].layer_range
        n = stop - start
        values.append([r.global_value("weight", si, f"layers.{i}", layer_t(i, n)) for i in range(n)])
    assert values[0] == pytest.approx([0.0, 0.5, 1.0])
    assert values[1] == pytest.approx([0.0, 0.5, 1.0])
    assert values[2] == pytest.approx([1.0])  # a one-layer slice gets t = 1


def test_normalize_models_to_one_slice():
    cfg = load_config(MODELS)
    layers = {"a": 4, "b": 4, "base": 4}
    slices = normalize_to_slices(cfg, lambda ref: layers[str(ref)])
    assert len(slices) == 1
    srcs = slices[0].sources
    assert [str(s.model) for s in srcs] == ["a", "b", "base"]
    assert all(s.layer_range == (0, 4) for s in srcs)
    assert srcs[0].parameters["weight"] == 0.3
    assert srcs[1].parameters is None and srcs[2].parameters is None


def test_normalize_does_not_duplicate_listed_base():
    cfg = load_config(
        """
merge_method: task_arithmetic
base_model: base
models:
  - model: base
  - model: a
    parameters: {weight: 0.7}
"""
    )
    slices = normalize_to_slices(cfg, lambda ref: 2)
    assert [str(s.model) for s in slices[0].sources] == ["base", "a"]


def test_normalize_keeps_slices():
    cfg = load_config(SLICES)
    slices = normalize_to_slices(cfg, lambda ref: pytest.fail("not needed for slices"))
    assert slices == list(cfg.slices)
    assert isinstance(slices[0].sources[0].model, ModelReference)


def test_int_gradient_interpolates_to_float():
    v = evaluate([0, 2], "x", 0.25)
    assert v == 0.5 and isinstance(v, float)
    assert not math.isnan(evaluate([1, 1, 1], "x", 1.0))
