"""No input tensor is left out unsaid: a tensor some models lack is merged from each model's
effective tensor (a tied model's embedding stands in for its head), or the plan stops with an
error naming it and the models that lack it, or it is listed as excluded with the reason.

Golden values are plain torch over the input files."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_state, run_yaml
from mergekitty.api import plan_merge
from mergekitty.errors import PlanError
from mergekitty.plan import MergePlan, Planner

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _variant(src, dst, drop=(), add=None, config=None):
    """A copy of model ``src`` without the tensors ``drop``, with ``add``, and its config.json updated by ``config``."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(str(weights))
    for name in drop:
        del state[name]
    state.update(add or {})
    save_file(state, str(weights), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def untied(qwen2, tmp_path_factory):
    """A fine-tune of the tied qwen2 family that trained its own head: lm_head.weight, untied config."""
    emb = load_file(str(qwen2["ft2"] / "model.safetensors"))[EMBED]
    head = emb + 0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(7))
    dst = tmp_path_factory.mktemp("untied") / "ft_untied"
    return _variant(qwen2["ft2"], dst, add={HEAD: head}, config={"tie_word_embeddings": False})


def _head(state):
    """A model's effective head: its lm_head.weight, else (tied embeddings) its input embedding."""
    return state.get(HEAD, state[EMBED]).double()


def _tie(out):
    return json.loads((out / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.parametrize("untied_first", [False, True], ids=["tied-first", "untied-first"])
def test_linear_merges_the_finetunes_head_with_the_tied_models_embedding(
    qwen2, untied, tmp_path, write_yaml, untied_first
):
    models = [(qwen2["base"], 0.7), (untied, 0.3)]
    if untied_first:
        models.reverse()
    listed = "".join(f"\n  - model: {m}\n    parameters: {{weight: {w}}}" for m, w in models)
    out = tmp_path / "out"
    run_yaml(write_yaml(f"models:{listed}\nmerge_method: linear\ndtype: float32\n"), out)
    got, base, ft = read_state(out), read_state(qwen2["base"]), read_state(untied)
    assert HEAD not in base
    torch.testing.assert_close(got[HEAD].double(), 0.7 * _head(base) + 0.3 * _head(ft), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[EMBED].double(), 0.7 * base[EMBED].double() + 0.3 * ft[EMBED].double())
    assert _tie(out) is False  # the written head is the model's head, not a copy of the embedding


def test_ties_merges_effective_heads(qwen2, untied, tmp_path, write_yaml):
    """TIES over the heads of a tied base, a tied fine-tune and an untied one: each tied model's
    head is its embedding (density 1: sign election and disjoint mean only)."""
    out = tmp_path / "out"
    run_yaml(
        write_yaml(f"""
models:
  - model: {qwen2["ft1"]}
    parameters: {{weight: 1.0, density: 1.0}}
  - model: {untied}
    parameters: {{weight: 0.5, density: 1.0}}
base_model: {qwen2["base"]}
merge_method: ties
dtype: float32
"""),
        out,
    )
    base = _head(read_state(qwen2["base"]))
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64).view(-1, 1, 1)
    deltas = torch.stack([_head(read_state(qwen2["ft1"])) - base, _head(read_state(untied)) - base]) * weights
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (deltas.sign() == sign).double()
    divisor = (weights * agree).sum(0)
    expected = base + (deltas * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    torch.testing.assert_close(read_state(out)[HEAD].double(), expected, rtol=1e-5, atol=1e-6)
    assert _tie(out) is False


def test_the_stand_in_embedding_is_said_in_one_line(qwen2, untied, caplog):
    with caplog.at_level(logging.WARNING, logger="mergekitty.plan"):
        plan = plan_merge(f"""
models:
  - model: {qwen2["base"]}
  - model: {untied}
merge_method: linear
parameters: {{weight: 1.0}}
""")
    lines = [r.getMessage() for r in caplog.records if HEAD in r.getMessage()]
    assert len(lines) == 1 and str(qwen2["base"]) in lines[0] and "tie_word_embeddings: false" in lines[0]
    head = {j.out_name: j for j in plan.jobs}[HEAD]
    assert [(plan.models[s.model].path, s.tensor) for s in head.sources] == [(qwen2["base"], EMBED), (untied, HEAD)]
    assert plan.out_config["tie_word_embeddings"] is False


def test_passthrough_takes_the_head_from_the_last_slice(qwen2, untied):
    def plan_of(first, last):
        return plan_merge(f"""
slices:
  - sources: [{{model: {first}, layer_range: [0, 2]}}]
  - sources: [{{model: {last}, layer_range: [2, 4]}}]
merge_method: passthrough
""")

    plan = plan_of(qwen2["base"], untied)  # the tied base's config.json is the output's
    head = {j.out_name: j for j in plan.jobs}[HEAD]
    assert (plan.models[head.sources[0].model].path, head.sources[0].tensor) == (untied, HEAD)
    assert plan.out_config["tie_word_embeddings"] is False

    plan = plan_of(untied, qwen2["base"])  # the tied base ends the stack: its embedding is its head
    head = {j.out_name: j for j in plan.jobs}[HEAD]
    assert (plan.models[head.sources[0].model].path, head.sources[0].tensor) == (qwen2["base"], EMBED)
    assert plan.out_config["tie_word_embeddings"] is False
    unused = {(plan.models[e.model].path, t): e.reason for e in plan.excluded for t in e.tensors}
    assert "after the layer stack" in unused[(untied, HEAD)]


@pytest.fixture(scope="module")
def lacking(llama, tmp_path_factory):
    """llama ft1 without one layer tensor."""
    return _variant(
        llama["ft1"], tmp_path_factory.mktemp("lacking") / "ft1", drop=["model.layers.1.mlp.down_proj.weight"]
    )


@pytest.mark.parametrize("where", ["first", "second", "base"])
def test_a_model_lacking_a_layer_tensor_is_an_error(llama, lacking, where):
    """Wherever the model lacking it stands (the first source used to decide the layer's
    tensors, so it was silently dropped there), the error names the tensor and that model."""
    ft1 = lacking if where != "base" else llama["ft1"]
    sources = [ft1, llama["ft2"]] if where != "second" else [llama["ft2"], ft1]
    base = lacking if where == "base" else llama["base"]
    listed = "".join(f"\n  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}" for m in sources)
    with pytest.raises(PlanError) as err:
        plan_merge(f"models:{listed}\nbase_model: {base}\nmerge_method: ties\n")
    message = str(err.value)
    assert "'model.layers.1.mlp.down_proj.weight' is missing from " + str(lacking) + " but present in" in message
    assert "\n" not in message


@pytest.mark.parametrize("extra_first", [False, True])
def test_a_tensor_only_one_model_has_is_an_error(llama, tmp_path, extra_first):
    extra = _variant(llama["ft1"], tmp_path / "extra", add={"model.layers.1.self_attn.q_norm.weight": torch.ones(16)})
    models = [extra, llama["base"]] if extra_first else [llama["base"], extra]
    listed = "".join(f"\n  - model: {m}" for m in models)
    with pytest.raises(PlanError, match=r"'model\.layers\.1\.self_attn\.q_norm\.weight' is missing from (.*)base but"):
        plan_merge(f"models:{listed}\nmerge_method: linear\nparameters: {{weight: 1.0}}\n")


def test_an_untied_model_without_a_head_is_an_error(qwen2, untied, tmp_path):
    """Its embedding is not its head: transformers would give it a random one."""
    broken = _variant(qwen2["ft1"], tmp_path / "headless", config={"tie_word_embeddings": False})
    with pytest.raises(
        PlanError, match=r"'lm_head\.weight' is missing from .*headless \(its config.json says tie_word"
    ):
        plan_merge(
            f"models:\n  - model: {untied}\n  - model: {broken}\nmerge_method: linear\nparameters: {{weight: 1.0}}\n"
        )


def test_rebuilt_buffers_some_models_lack_are_left_out(llama, tmp_path):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    with_buffer = _variant(llama["ft1"], tmp_path / "buffer", add={name: torch.arange(8.0)})
    plan = plan_merge(
        f"models:\n  - model: {llama['base']}\n  - model: {with_buffer}\nmerge_method: linear\nparameters: {{weight: 1.0}}\n"
    )
    assert name not in {j.out_name for j in plan.jobs}
    [excluded] = plan.excluded
    assert (
        excluded.tensors == (name,) and "rebuilds at load time, missing from " + str(llama["base"]) in excluded.reason
    )
    # every model carries it: it is merged like any tensor
    both = _variant(llama["base"], tmp_path / "buffer2", add={name: torch.arange(8.0)})
    plan = plan_merge(
        f"models:\n  - model: {both}\n  - model: {with_buffer}\nmerge_method: linear\nparameters: {{weight: 1.0}}\n"
    )
    assert name in {j.out_name for j in plan.jobs} and plan.excluded == ()


FRANKEN = """
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [2, 4]}}]
merge_method: passthrough
"""


def test_every_input_tensor_is_read_or_excluded_with_a_reason(llama):
    plan = plan_merge(FRANKEN.format(a=llama["ft1"], b=llama["ft2"]))
    read = {(s.model, s.tensor) for j in plan.jobs for s in j.inputs}
    excluded = {(e.model, t): e.reason for e in plan.excluded for t in e.tensors}
    assert not read & set(excluded)
    for i, m in enumerate(plan.models):
        names = set(load_file(str(m.path / "model.safetensors")))
        assert {t for (mi, t) in read | set(excluded) if mi == i} == names
    assert excluded[(0, "model.layers.3.mlp.up_proj.weight")] == "a layer outside the slices' layer ranges"
    assert excluded[(1, "model.layers.1.mlp.up_proj.weight")] == "a layer outside the slices' layer ranges"
    assert "after the layer stack" in excluded[(0, "model.norm.weight")]
    assert "before the layer stack" in excluded[(1, EMBED)]
    assert MergePlan.from_json(plan.to_json()).excluded == plan.excluded


def test_a_tensor_the_enumeration_misses_stops_the_plan(llama, monkeypatch):
    """The check does not trust the enumeration of output tensors: one it drops is an error."""
    enumerate_all = Planner._output_tensors

    def dropping(self, picks, layer_map):
        return (t for t in enumerate_all(self, picks, layer_map) if t.out_name != "model.layers.1.mlp.up_proj.weight")

    monkeypatch.setattr(Planner, "_output_tensors", dropping)
    with pytest.raises(PlanError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' of .*ft1 would be left out"):
        plan_merge(FRANKEN.format(a=llama["ft1"], b=llama["ft2"]))


def test_a_tensor_one_model_adds_follows_the_outputs_naming_scheme():
    """Vision-language checkpoints saved under either scheme merge; a head only one of them has
    is written under the scheme of the output (named by its layer stack)."""
    from mergekitty.architecture.layout import spelled_like

    assert spelled_like(HEAD, ["language_model.model.layers"]) == "language_model.lm_head.weight"
    assert spelled_like("language_model.lm_head.weight", ["model.language_model.layers"]) == HEAD
    assert spelled_like(HEAD, ["model.layers"]) == HEAD


def test_mergekitty_plan_lists_what_it_leaves_out_and_why(llama, write_yaml, cli):
    config = write_yaml(f"""
slices:
  - sources:
      - model: {llama["ft1"]}
        layer_range: [0, 1]
  - sources:
      - model: {llama["ft2"]}
        layer_range: [1, 2]
merge_method: passthrough
""")
    out = cli("mergekitty", "plan", config).stdout
    lines = [line for line in out.splitlines() if "left out of" in line]
    assert any(str(llama["ft1"]) in line and "layer outside the slices" in line for line in lines), out
    assert any(str(llama["ft2"]) in line and "before the layer stack" in line for line in lines), out
