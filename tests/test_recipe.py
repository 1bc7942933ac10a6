"""Multi-stage recipes: the fused run (one plan, intermediates computed in memory) writes the same
bytes as running the stages one after another through files; the plan says what is fused; the
recipe's own mistakes are one line with the file and line, found before any weight is read."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekitty.api import MergeOptions, run_merge
from mergekitty.errors import ConfigError
from mergekitty.recipe import load_recipe, plan_recipe, run_recipe

OPTIONS = MergeOptions(quiet=True)


def _ref_to(value: str, written: dict[str, str]) -> str:
    model, plus, lora = value.partition("+")
    return written.get(model, model) + plus + lora


def _substituted(doc: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    """``doc`` with every model reference naming a written stage replaced by its directory."""
    doc = copy.deepcopy(doc)
    doc.pop("name", None)
    for group in [doc, *(doc.get("modules") or {}).values()]:
        if "base_model" in group:
            group["base_model"] = _ref_to(group["base_model"], written)
        for m in group.get("models") or ():
            m["model"] = _ref_to(m["model"], written)
        for sl in group.get("slices") or ():
            for src in sl["sources"]:
                src["model"] = _ref_to(src["model"], written)
    if isinstance(doc.get("tokenizer_source"), str) and doc["tokenizer_source"] not in ("union", "base"):
        doc["tokenizer_source"] = _ref_to(doc["tokenizer_source"], written)
    return doc


def staged(docs: list[dict[str, Any]], root: Path) -> Path:
    """The reference: each document merged on its own into ``root/<name>``, in order, later
    documents reading the earlier ones' directories (what the other tools do). The last is the result."""
    written: dict[str, str] = {}
    for doc in docs:
        name = doc.get("name", "final")
        out = root / name
        run_merge(yaml.safe_dump(_substituted(doc, written)), out, OPTIONS)
        written[name] = str(out)
    return root / docs[-1].get("name", "final")


def fused(docs: list[dict[str, Any]], root: Path, **kwargs: Any) -> Path:
    text = yaml.safe_dump_all(docs, sort_keys=False)
    root.mkdir(parents=True, exist_ok=True)
    recipe_file = root / "recipe.yml"
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file)
    final = docs[-1].get("name", "recipe")
    out = root / "fused"
    run_recipe(recipe, {final: out}, OPTIONS, **kwargs)
    return out


def weights(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_bytes(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert list(wa) == list(wb)
    different = [
        k
        for k in wa
        if wa[k].dtype != wb[k].dtype
        or wa[k].shape != wb[k].shape
        or not torch.equal(wa[k].reshape(-1).view(torch.uint8), wb[k].reshape(-1).view(torch.uint8))
    ]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def models_doc(method: str, models: list[str], base: str | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base is not None:
        doc["base_model"] = base
    doc.update(extra)
    return doc


def check(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    a = fused(docs, tmp_path / "a")
    b = staged(docs, tmp_path / "b")
    assert_same_bytes(a, b)
    return a


def test_linear_then_ties_across_dtypes(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {
            "name": "avg",
            **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": [0.2, 0.8]}, dtype="bfloat16"),
        },
        {
            "merge_method": "ties",
            "base_model": p["base"],
            "models": [
                {"model": "avg", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": p["ft3"], "parameters": {"weight": 0.4, "density": 0.7}},
            ],
            "dtype": "float16",
        },
    ]
    out = check(docs, tmp_path)
    assert not (tmp_path / "a" / "avg").exists()
    assert weights(out)["model.embed_tokens.weight"].dtype == torch.float16


def test_model_stock_slerp_task_arithmetic(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {"name": "stock", **models_doc("model_stock", [p["ft1"], p["ft2"], p["ft3"]], p["base"], dtype="float32")},
        {"name": "sl", **models_doc("slerp", ["stock", p["ft1"]], "stock", parameters={"t": [0.1, 0.9]})},
        models_doc(
            "task_arithmetic",
            ["sl", p["ft2"]],
            p["base"],
            parameters={"weight": 0.6},
            dtype="bfloat16",
        ),
    ]
    check(docs, tmp_path)


def test_frankenmerge_stage_feeds_a_merge_and_a_merge_feeds_a_frankenmerge(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {
            "name": "avg",
            **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 1.0}),
        },
        {
            # layers of the intermediate read twice (overlapping ranges) and mixed with a model's
            "name": "stack",
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "avg", "layer_range": [0, 3]}]},
                {"sources": [{"model": p["ft3"], "layer_range": [1, 2]}]},
                {"sources": [{"model": "avg", "layer_range": [1, 4]}]},
            ],
        },
        {
            "merge_method": "dare_ties",
            "base_model": "stack",
            "models": [{"model": "stack"}, {"model": "stack", "parameters": {"weight": 0.5}}],
            "parameters": {"weight": 0.5, "density": 0.6},
            "random_seed": 11,
        },
    ]
    out = check(docs, tmp_path)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 7


def test_random_stages_keep_their_own_seeds(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {
            "name": "d1",
            **models_doc(
                "dare_ties", [p["ft1"], p["ft2"]], p["base"], parameters={"weight": 0.5, "density": 0.5}, random_seed=3
            ),
        },
        {
            "name": "d2",
            **models_doc(
                "della",
                [p["ft2"], p["ft3"]],
                p["base"],
                parameters={"weight": 0.5, "density": 0.5, "epsilon": 0.1},
                random_seed=4,
            ),
        },
        models_doc("linear", ["d1", "d2"], parameters={"weight": 0.5}),
    ]
    check(docs, tmp_path)


def test_union_vocabulary_stage_feeds_a_merge(llama, tmp_path):
    from mergekitty.tiny_models import add_special_tokens

    p = {k: str(v) for k, v in llama.items()}
    chat = str(add_special_tokens(p["ft1"], tmp_path / "chat", ("<|im_start|>", "<|im_end|>")))
    docs = [
        {"name": "u", **models_doc("linear", [p["ft2"], chat], parameters={"weight": 0.5}, tokenizer_source="union")},
        models_doc("ties", ["u", chat], p["base"], parameters={"weight": 0.5, "density": 0.5}, tokenizer_source="u"),
    ]
    out = check(docs, tmp_path)
    assert weights(out)["model.embed_tokens.weight"].shape[0] == 98


def lora_adapter(base: str, out: Path, seed: int, modules: list[str]) -> Path:
    """A PEFT LoRA adapter of ``base`` with random B factors (so it changes the model)."""
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=modules))
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    pm.save_pretrained(str(out))
    return out


def test_a_stage_with_a_lora_input(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    lora_adapter(p["base"], tmp_path / "adapter", 1, ["q_proj", "v_proj"])
    docs = [
        {
            "name": "ad",
            **models_doc("linear", [f"{p['ft1']}+{tmp_path / 'adapter'}", p["ft2"]], parameters={"weight": 1}),
        },
        models_doc("slerp", ["ad", p["ft3"]], "ad", parameters={"t": 0.4}),
    ]
    check(docs, tmp_path)


def test_four_stages_where_two_read_one(llama, tmp_path):
    """A diamond: 'a' is read by 'b' and by the final merge, which also reads 'c' (made from 'b')."""
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {"name": "a", **models_doc("nearswap", [p["ft1"], p["ft2"]], p["ft1"], parameters={"t": 0.001})},
        {"name": "b", **models_doc("karcher", ["a", p["ft3"]], dtype="float16")},
        {
            "name": "c",
            **models_doc(
                "breadcrumbs", ["b", p["ft2"]], p["base"], parameters={"weight": 0.5, "density": 0.9, "gamma": 0.01}
            ),
        },
        models_doc("multislerp", ["c", "a"], parameters={"weight": 0.5}, dtype="bfloat16"),
    ]
    check(docs, tmp_path)
    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(docs))
    rplan = plan_recipe(load_recipe(tmp_path / "r.yml"), ["r"], OPTIONS)
    summary = rplan.summary()
    # 'a' is read by 'b' (once per tensor, and 'b' by 'c', 'c' by the result) and by the result
    a_line = next(line for line in summary.splitlines() if line.startswith("stage 'a'"))
    assert "fused into 'b', 'r'" in a_line and "computed more than once" in a_line
    assert "more than once" not in next(line for line in summary.splitlines() if line.startswith("stage 'c'"))


FIRST_STAGES: dict[str, dict[str, Any]] = {
    "linear": {"parameters": {"weight": [0.3, 0.7]}},
    "task_arithmetic": {"parameters": {"weight": 0.5}},
    "ties": {"parameters": {"weight": 0.5, "density": 0.5}},
    "dare_linear": {"parameters": {"weight": 0.5, "density": 0.6}, "random_seed": 2},
    "dare_ties": {"parameters": {"weight": 0.5, "density": 0.6}, "random_seed": 2},
    "breadcrumbs": {"parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
    "breadcrumbs_ties": {"parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
    "della": {"parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}, "random_seed": 2},
    "della_linear": {"parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}, "random_seed": 2},
    "slerp": {"parameters": {"t": 0.3}},
    "nuslerp": {"parameters": {"weight": [0.4, 0.6]}},
    "multislerp": {"parameters": {"weight": [0.4, 0.6]}},
    "karcher": {},
    "model_stock": {},
    "sce": {"parameters": {"select_topk": 0.5}},
    "nearswap": {"parameters": {"t": 0.01}},
    "arcee_fusion": {},
}
# methods whose base model is one of the two merged models rather than a third
TWO_MODEL_BASE = {"slerp", "nearswap", "arcee_fusion"}
NO_BASE = {"linear", "nuslerp", "multislerp", "karcher"}


def _first_stage(method: str, p: dict[str, str], dtype: str) -> dict[str, Any]:
    extra = copy.deepcopy(FIRST_STAGES[method])
    if method in TWO_MODEL_BASE:
        doc = models_doc(method, [p["ft1"], p["ft2"]], p["ft1"], **extra)
    elif method in NO_BASE:
        doc = models_doc(method, [p["ft1"], p["ft2"]], **extra)
    elif method == "model_stock":
        doc = models_doc(method, [p["ft1"], p["ft2"], p["ft3"]], p["base"], **extra)
    else:
        doc = models_doc(method, [p["ft1"], p["ft2"]], p["base"], **extra)
    if method == "nuslerp":
        doc["models"] = [{"model": m["model"], "parameters": {"weight": w}} for m, w in zip(doc["models"], [0.4, 0.6])]
        doc.pop("parameters")
    if method == "multislerp":
        doc["models"] = [{"model": m["model"], "parameters": {"weight": w}} for m, w in zip(doc["models"], [0.4, 0.6])]
        doc.pop("parameters")
    return {"name": "first", **doc, "dtype": dtype}


SECOND_STAGES = {
    "linear": lambda p: models_doc("linear", ["first", p["ft3"]], parameters={"weight": [0.6, 0.4]}),
    "ties": lambda p: models_doc("ties", ["first", p["ft3"]], p["base"], parameters={"weight": 0.5, "density": 0.5}),
    "slerp": lambda p: models_doc("slerp", ["first", p["ft3"]], "first", parameters={"t": 0.6}),
}


@pytest.mark.slow
@pytest.mark.parametrize("second", sorted(SECOND_STAGES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("first", sorted(FIRST_STAGES))
def test_every_method_feeds_the_next_stage_as_if_written(llama, tmp_path, first, dtype, second):
    p = {k: str(v) for k, v in llama.items()}
    docs = [_first_stage(first, p, dtype), {**SECOND_STAGES[second](p), "out_dtype": "bfloat16"}]
    check(docs, tmp_path)


def test_write_intermediates_writes_each_stage_as_its_own_merge_would(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {"name": "avg", **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5})},
        models_doc("ties", ["avg", p["ft3"]], p["base"], parameters={"weight": 0.5, "density": 0.5}),
    ]
    fused(docs, tmp_path / "a", write_intermediates=tmp_path / "inter")
    staged(docs, tmp_path / "b")
    assert_same_bytes(tmp_path / "inter" / "avg", tmp_path / "b" / "avg")
    assert_same_bytes(tmp_path / "a" / "fused", tmp_path / "b" / "final")


def test_plan_says_what_is_fused_and_counts_the_intermediates_memory(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {"name": "avg", **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5})},
        models_doc("ties", ["avg", p["ft3"]], p["base"], parameters={"weight": 0.5, "density": 0.5}),
    ]
    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(docs))
    recipe = load_recipe(tmp_path / "r.yml")
    rplan = plan_recipe(recipe, ["r"], OPTIONS)
    summary = rplan.summary({"r": tmp_path / "out"})
    assert "stage 'avg': linear of" in summary and "fused into 'r'" in summary
    assert f"written to {tmp_path / 'out'}" in summary
    final = rplan["r"].plan
    assert final.models[1].stage is not None and final.models[1].stage.method.name == "linear"
    # what the fused plan reads is every tensor of the four models once: the intermediate is not read
    from mergekitty.io.checkpoint import Checkpoint

    every_byte = sum(i.nbytes for m in ("base", "ft1", "ft2", "ft3") for i in Checkpoint(llama[m]).infos.values())
    assert final.input_bytes == every_byte
    # a stage's tensor is a buffer the job holds: the estimate exceeds the same merge of written models
    staged_root = tmp_path / "b"
    staged(docs[:1], staged_root)
    from mergekitty.api import plan_merge

    written = plan_merge(yaml.safe_dump(_substituted(docs[1], {"avg": str(staged_root / "avg")})), None, OPTIONS)
    assert final.memory_estimate().buffers_bytes > written.memory_estimate().buffers_bytes
    assert not (tmp_path / "out").exists()


def test_plan_json_of_a_fused_recipe_round_trips(llama, tmp_path):
    from mergekitty.plan import MergePlan

    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {"name": "avg", **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5})},
        models_doc("slerp", ["avg", p["ft3"]], "avg", parameters={"t": 0.5}),
    ]
    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(docs))
    plan = plan_recipe(load_recipe(tmp_path / "r.yml"), ["r"], OPTIONS)["r"].plan
    again = MergePlan.from_json(plan.to_json())
    assert again.models[0].stage is not None
    assert again.models[0].stage.jobs == plan.models[0].stage.jobs


# ----------------------------------------------------------------------------- mistakes in the recipe


def error_of(text: str, tmp_path: Path) -> ConfigError:
    f = tmp_path / "bad.yml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    return info.value


def test_a_cycle_is_an_error_at_the_reference_that_closes_it(tmp_path):
    err = error_of(
        "name: a\nmerge_method: linear\nmodels:\n  - model: b\n---\nname: b\nmerge_method: linear\nmodels:\n  - model: a\n",
        tmp_path,
    )
    assert "cycle: a -> b -> a" in str(err) or "cycle: b -> a -> b" in str(err)
    assert err.line in (4, 9) and "bad.yml" in str(err)


def test_an_unknown_name_is_an_error_with_a_did_you_mean(tmp_path):
    err = error_of(
        "name: stock\nmerge_method: linear\nmodels:\n  - model: ./m\n---\nmerge_method: linear\nmodels:\n"
        "  - model: stokc\n",
        tmp_path,
    )
    assert err.line == 8
    assert "'stokc' is neither the name of a document" in str(err) and "did you mean 'stock'" in str(err)


def test_a_single_segment_hub_id_is_ambiguous(tmp_path):
    err = error_of(
        "name: a\nmerge_method: linear\nmodels:\n  - model: ./m\n---\nmerge_method: linear\nmodels:\n  - model: gpt2\n",
        tmp_path,
    )
    assert err.line == 8 and "organisation/name" in str(err)


def test_a_name_that_is_also_a_local_directory_is_ambiguous(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    err = error_of(
        "name: a\nmerge_method: linear\nmodels:\n  - model: ./m\n---\nmerge_method: linear\nmodels:\n  - model: a\n",
        tmp_path,
    )
    assert err.line == 8 and "both the name of a document" in str(err) and "./a" in str(err)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (
            "merge_method: linear\nmodels: [{model: ./x}]\n---\nmerge_method: linear\nmodels: [{model: ./y}]\n",
            4,
            "at most one document",
        ),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: ./x}]\n---\nname: a\nmerge_method: linear\nmodels: [{model: ./y}]\n",
            5,
            "also the name",
        ),
        ("name: a/b\nmerge_method: linear\nmodels: [{model: ./x}]\n", 1, "one path segment"),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: ./x}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: recipe}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n",
            7,
            "no other document can read",
        ),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: ./x}]\n---\nmerge_method: linear\nmodels: [{model: './m+a'}]\n",
            6,
            "not a LoRA adapter",
        ),
    ],
)
def test_recipe_mistakes_name_their_line(tmp_path, text, line, words):
    f = tmp_path / "recipe.yml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    assert info.value.line == line and words in str(info.value)


def test_recipe_errors_come_before_any_model_is_opened(tmp_path, cli):
    # the first document's models do not exist; the cycle is what is reported
    f = tmp_path / "r.yml"
    f.write_text(
        "name: a\nmerge_method: linear\nmodels:\n  - model: b\n---\nname: b\nmerge_method: linear\nmodels:\n  - model: a\n  - model: ./missing\n"
    )
    proc = cli("mergekitty", "merge", f, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "cycle" in proc.stderr and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the commands


def _two_stage(p: dict[str, str], final_name: str | None = None) -> str:
    docs = [
        {"name": "avg", **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5})},
        models_doc("ties", ["avg", p["ft3"]], p["base"], parameters={"weight": 0.5, "density": 0.5}),
    ]
    if final_name:
        docs[1] = {"name": final_name, **docs[1]}
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.mark.slow
def test_merge_plan_mega_and_multi_commands(llama, tmp_path, cli):
    p = {k: str(v) for k, v in llama.items()}
    recipe = tmp_path / "two.yml"
    recipe.write_text(_two_stage(p))
    planned = cli("mergekitty", "plan", recipe)
    assert "stage 'avg': linear" in planned.stdout and "fused into 'two'" in planned.stdout
    cli("mergekitty", "merge", recipe, tmp_path / "m", "-q")
    cli("mergekitty-yaml", recipe, tmp_path / "y", "-q")
    cli("mergekitty-mega", recipe, tmp_path / "mega", "-q")
    assert sorted(x.name for x in (tmp_path / "mega").iterdir()) == ["two"]
    cli("mergekitty", "multi", recipe, "--out-path", tmp_path / "multi", "-q")
    ref = staged(list(yaml.safe_load_all(recipe.read_text())), tmp_path / "ref")
    for out in (tmp_path / "m", tmp_path / "y", tmp_path / "mega" / "two", tmp_path / "multi"):
        assert_same_bytes(out, ref)
    assert "name: avg" in (tmp_path / "m" / "mergekitty_config.yml").read_text()
    # mega again: the result exists and is kept unless --force
    again = cli("mergekitty-mega", recipe, tmp_path / "mega")
    assert "skipped two" in again.stderr
    forced = cli("mergekitty", "mega", recipe, tmp_path / "mega", "--force", "-q")
    assert "skipped" not in forced.stderr


@pytest.mark.slow
def test_multi_lazy_reads_an_intermediate_already_written(llama, tmp_path, cli):
    import shutil

    p = {k: str(v) for k, v in llama.items()}
    recipe = tmp_path / "two.yml"
    recipe.write_text(_two_stage(p))
    # an 'avg' already in the intermediate directory (here: a copy of ft3) is used as it is
    shutil.copytree(p["ft3"], tmp_path / "inter" / "avg")
    cli("mergekitty-multi", recipe, "--out-path", tmp_path / "lazy", "-I", tmp_path / "inter", "-q")
    docs = list(yaml.safe_load_all(recipe.read_text()))
    want = tmp_path / "want"
    run_merge(yaml.safe_dump(_substituted(docs[1], {"avg": str(tmp_path / "inter" / "avg")})), want, OPTIONS)
    assert_same_bytes(tmp_path / "lazy", want)
    cli("mergekitty", "multi", recipe, "--out-path", tmp_path / "eager", "-I", tmp_path / "inter", "--no-lazy", "-q")
    assert_same_bytes(tmp_path / "eager", staged(docs, tmp_path / "ref"))


def test_multi_needs_a_place_for_a_named_result(llama, tmp_path, cli):
    p = {k: str(v) for k, v in llama.items()}
    recipe = tmp_path / "two.yml"
    recipe.write_text(_two_stage(p, final_name="final"))
    proc = cli("mergekitty", "multi", recipe, "--out-path", tmp_path / "o", check=False)
    assert proc.returncode != 0 and "--intermediate-dir" in proc.stderr and "two.yml:" in proc.stderr


def test_the_recorded_recipe_reproduces_drawn_seeds(llama, tmp_path):
    """Random stages without a random_seed draw one; the result records every document with its
    seed, and running that record again gives the same bytes."""
    p = {k: str(v) for k, v in llama.items()}
    docs = [
        {
            "name": "d",
            **models_doc("dare_ties", [p["ft1"], p["ft2"]], p["base"], parameters={"weight": 0.5, "density": 0.5}),
        },
        models_doc("della", ["d", p["ft3"]], p["base"], parameters={"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    ]
    first = fused(docs, tmp_path / "a")
    recorded = (first / "mergekitty_config.yml").read_text()
    assert recorded.count("random_seed:") == 2 and "name: d" in recorded
    again = tmp_path / "again.yml"
    again.write_text(recorded)
    run_recipe(load_recipe(again), {"again": tmp_path / "b"}, OPTIONS)
    assert_same_bytes(first, tmp_path / "b")


def _two_docs(p: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": "avg", **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5})},
        models_doc("ties", ["avg", p["ft3"]], p["base"], parameters={"weight": 0.5, "density": 0.5}),
    ]


def test_the_output_cannot_be_a_model_a_fused_stage_reads(llama, tmp_path):
    from mergekitty.errors import OutputError

    p = {k: str(v) for k, v in llama.items()}
    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(_two_docs(p)))
    recipe = load_recipe(tmp_path / "r.yml")
    with pytest.raises(OutputError, match="input model"):
        run_recipe(recipe, {"r": p["ft1"]}, OPTIONS)  # ft1 is read by 'avg' only
    # an intermediate written where one of its own inputs is
    import shutil

    shutil.copytree(p["ft1"], tmp_path / "inter" / "avg")
    docs = _two_docs({**p, "ft1": str(tmp_path / "inter" / "avg")})
    (tmp_path / "w.yml").write_text(yaml.safe_dump_all(docs))
    with pytest.raises(OutputError, match="input model"):
        run_recipe(
            load_recipe(tmp_path / "w.yml"), {"w": tmp_path / "out"}, OPTIONS, write_intermediates=tmp_path / "inter"
        )


def test_a_stage_read_with_a_lora_adapter(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    lora_adapter(p["base"], tmp_path / "adapter", 2, ["q_proj", "o_proj"])
    docs = [
        {"name": "avg", **models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5})},
        models_doc("linear", [f"avg+{tmp_path / 'adapter'}", p["ft3"]], parameters={"weight": 0.5}),
    ]
    check(docs, tmp_path)


def test_side_files_of_a_stage_are_written_once(llama, tmp_path):
    from mergekitty.recipe.plan import cache_root

    p = {k: str(v) for k, v in llama.items()}
    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(_two_docs(p)))
    recipe = load_recipe(tmp_path / "r.yml")
    first = plan_recipe(recipe, ["r"], OPTIONS)["avg"].directory
    again = plan_recipe(recipe, ["r"], OPTIONS)["avg"].directory  # another drawn seed, for a linear merge
    assert first == again and first is not None and first.parent == cache_root() / "stages"


def test_a_recipe_file_of_any_name_and_an_unknown_target(llama, tmp_path):
    p = {k: str(v) for k, v in llama.items()}
    (tmp_path / "recipe.txt").write_text(yaml.safe_dump_all(_two_docs(p)))
    recipe = load_recipe(str(tmp_path / "recipe.txt"))
    assert recipe.names == ["avg", "recipe"]
    with pytest.raises(ConfigError, match="no document 'recipes'.*did you mean 'recipe'"):
        run_recipe(recipe, {"recipes": tmp_path / "out"}, OPTIONS)


def test_a_non_finite_stage_is_one_line_naming_the_stage(llama, tmp_path):
    import shutil

    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    from mergekitty.errors import MergeError

    p = {k: str(v) for k, v in llama.items()}
    bad = tmp_path / "bad"
    shutil.copytree(p["ft1"], bad)
    weights_file = next(bad.glob("*.safetensors"))
    state = load(str(weights_file))
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    save_file(state, str(weights_file), metadata={"format": "pt"})
    docs = [
        {"name": "avg", **models_doc("linear", [str(bad), p["ft2"]], parameters={"weight": 0.5})},
        models_doc("linear", ["avg", p["ft3"]], parameters={"weight": 0.5}),
    ]
    with pytest.raises(MergeError, match=r"stage 'avg': .*" + name.replace(".", r"\.")):
        fused(docs, tmp_path / "a")
    # with --allow-nonfinite the fused result is the staged one
    options = MergeOptions(quiet=True, allow_nonfinite=True)
    text = yaml.safe_dump_all(docs, sort_keys=False)
    (tmp_path / "nf.yml").write_text(text)
    run_recipe(load_recipe(tmp_path / "nf.yml"), {"nf": tmp_path / "nf"}, options)
    written: dict[str, str] = {}
    for doc in docs:
        out = tmp_path / "nf-staged" / doc.get("name", "final")
        run_merge(yaml.safe_dump(_substituted(doc, written)), out, options)
        written[doc.get("name", "final")] = str(out)
    assert_same_bytes(tmp_path / "nf", tmp_path / "nf-staged" / "final")


def test_a_merge_without_a_seed_resumes(llama):
    from mergekitty.api import _resume_key, plan_merge

    p = {k: str(v) for k, v in llama.items()}
    config = yaml.safe_dump(models_doc("linear", [p["ft1"], p["ft2"]], parameters={"weight": 0.5}))
    a, b = (plan_merge(config, None, OPTIONS, out_shard_size=100_000) for _ in range(2))
    assert a.random_seed != b.random_seed and _resume_key(a) == _resume_key(b) is not None


def test_runs_sharing_a_stage_at_once_each_find_its_side_files(llama, tmp_path, monkeypatch):
    """Two plans of one stage at the same moment (a sweep over the last stage run in parallel)."""
    import threading

    from mergekitty.recipe import plan as recipe_plan

    monkeypatch.setenv("MERGEKITTY_CACHE", str(tmp_path / "cache"))
    p = {k: str(v) for k, v in llama.items()}
    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(_two_docs(p)))
    recipe = load_recipe(tmp_path / "r.yml")
    plan = plan_recipe(recipe, ["avg"], OPTIONS)["avg"].plan
    from mergekitty.io.output import OutputTransaction

    both = threading.Barrier(2)
    found: list[Path] = []
    commit = OutputTransaction.commit

    def together(self, marker_text):  # both runs have written a copy of their own before either renames
        both.wait(timeout=10)
        return commit(self, marker_text)

    monkeypatch.setattr(OutputTransaction, "commit", together)
    threads = [
        threading.Thread(target=lambda: found.append(recipe_plan.side_files(recipe["avg"], plan, OPTIONS)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 2 and found[0] == found[1] and (found[0] / "config.json").is_file()
    assert [d.name for d in (tmp_path / "cache" / "stages").iterdir()] == [found[0].name]
