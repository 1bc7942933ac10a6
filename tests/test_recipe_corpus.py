"""The recipe corpus (``tests/recipes/*.yml``): merge and MoE configs written the way people
publish them, each of which must run as written.

Every file starts with a header the test reads::

    #| kind: merge                    (or moe)
    #| ignored: 12 dype, 14 weight    (line and key of each key or parameter no merge reads)
    #| empty-prompts: 1               (moe: how many experts have empty prompts)

and names its models ``{base}``, ``{ft1}``, ``{ft2}``, ``{ft3}`` (the tiny llama family) or
``{outside}`` (a model with a tokenizer and no weights). For each file the test checks that:

1. it merges, warning once about each ignored key at the line the header gives, and about
   nothing else being ignored;
2. it gives exactly (every tensor, config.json, tokenizer) what the same config without the
   ignored keys gives. That config is built here with PyYAML (taught YAML 1.2's ``1e-5``
   floats), not with mergekitty's loader;
3. with ``strict`` it fails, before writing anything, with one line naming the first ignored
   key of the file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from helpers import read_state
from mergekitty import run_merge
from mergekitty.errors import ConfigError
from mergekitty.moe import build_moe

RECIPES = Path(__file__).parent / "recipes"
# one file per kind of thing the corpus checks, run in the default selection; the rest is slow
FAST = {
    "linear-slices-revision",
    "ties-stray-top-level",
    "multislerp-base-eps",
    "sce-with-weights",
    "moe-empty-prompts-stray-keys",
}
IGNORED = "as mergekit ignores it"
EMPTY_PROMPTS = "has empty prompts"
SEED = 0  # MoE configs have no random_seed key; random gates and expert noise draw from this


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # merge | moe
    ignored: tuple[tuple[int, str], ...]  # (line, key), in file order
    empty_prompts: int
    text: str


def read_recipe(name: str) -> Recipe:
    text = (RECIPES / f"{name}.yml").read_text()
    header = {}
    for line in text.splitlines():
        if not line.startswith("#|"):
            break
        key, _, value = line[2:].partition(":")
        header[key.strip()] = value.strip()
    ignored = []
    for entry in filter(None, (e.strip() for e in header.get("ignored", "").split(","))):
        line, key = entry.split()
        ignored.append((int(line), key))
    assert ignored == sorted(ignored), f"{name}: list the ignored keys in file order"
    return Recipe(name, header["kind"], tuple(ignored), int(header.get("empty-prompts", 0)), text)


NAMES = sorted(p.stem for p in RECIPES.glob("*.yml"))


def cases(names, xfail: dict[str, str] | None = None) -> list:
    """A parameter per recipe name: slow unless in FAST, expected to fail where ``xfail`` says why."""
    out = []
    for name in names:
        marks = [] if name in FAST else [pytest.mark.slow]
        if xfail and name in xfail:
            marks.append(pytest.mark.xfail(reason=xfail[name], strict=True))
        out.append(pytest.param(name, marks=marks))
    return out


# --------------------------------------------------------------------------- the plain config


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads ``1e-5`` (no dot, or no exponent sign) as a string; YAML 1.2 as a float."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _keys(node: Node, path: tuple = ()):
    """(line, key, key path) of every mapping key below ``node``."""
    if isinstance(node, MappingNode):
        for k, v in node.value:
            yield k.start_mark.line + 1, k.value, (*path, k.value)
            yield from _keys(v, (*path, k.value))
    elif isinstance(node, SequenceNode):
        for i, v in enumerate(node.value):
            yield from _keys(v, (*path, i))


def without_ignored(text: str, ignored) -> str:
    """``text`` as YAML again, without the keys at the (line, key)s of ``ignored``."""
    data = yaml.load(text, Loader=Yaml12Loader)
    paths = {}
    for line, key, path in _keys(yaml.compose(text, Loader=Yaml12Loader)):
        paths.setdefault((line, key), path)
    for where in ignored:
        assert where in paths, f"no key {where[1]!r} at line {where[0]}"
        *parents, last = paths[where]
        holder = data
        for p in parents:
            holder = holder[p]
        del holder[last]
    return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def models(llama, tmp_path_factory) -> dict[str, str]:
    """The placeholder paths: the llama family, and ``outside``, a model that has a tokenizer
    (the base's words and one more) and a config.json but no weights."""
    outside = tmp_path_factory.mktemp("outside") / "tokenizer-only"
    outside.mkdir()
    tok = json.loads((llama["base"] / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = len(tok["model"]["vocab"])
    (outside / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copyfile(llama["base"] / "tokenizer_config.json", outside / "tokenizer_config.json")
    cfg = json.loads((llama["base"] / "config.json").read_text())
    cfg["vocab_size"] = len(tok["model"]["vocab"])
    (outside / "config.json").write_text(json.dumps(cfg))
    return {**{k: str(v) for k, v in llama.items()}, "outside": str(outside)}


def substitute(text: str, models: dict[str, str]) -> str:
    for name, path in models.items():
        text = text.replace("{" + name + "}", path)
    assert not re.search(r"\{(base|ft\d|outside)\}", text)
    return text


def run(kind: str, config: Path, out: Path, caplog, **options) -> list[str]:
    """Merge (or build the MoE of) the config file; the WARNING messages it logged."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        if kind == "merge":
            run_merge(config, out, quiet=True, **options)
        else:
            build_moe(config, out, quiet=True, random_seed=SEED, **options)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


WARNING_AT = re.compile(r"^(?P<source>.*?):(?P<line>\d+), key '(?P<path>[^']*)': ")


def located(message: str, source: Path) -> tuple[int, str]:
    """(line, key) of a warning about a key of config file ``source``."""
    m = WARNING_AT.match(message)
    assert m and m["source"] == str(source), message
    return int(m["line"]), re.split(r"[.\[]", m["path"])[-1]


# files that hold the config text as written, so differ between the two configs
CONFIG_COPIES = {"README.md", "mergekitty_config.yml", "mergekitty_moe_config.yml"}


def assert_same_model(a: Path, b: Path) -> None:
    """Every tensor, config.json and every other file (tokenizer, chat template) the same."""
    names = {f.name for f in a.iterdir()}
    assert names == {f.name for f in b.iterdir()}
    got, want = read_state(a), read_state(b)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    for f in sorted(names - CONFIG_COPIES - {"config.json"}):
        if not f.endswith(".safetensors"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_the_corpus_covers_every_method_and_gate_mode():
    from mergekitty.methods.registry import method_names
    from mergekitty.moe import GATE_MODES

    somewhere = {k: f"/models/{k}" for k in ("base", "ft1", "ft2", "ft3", "outside")}
    recipes = [(r.kind, yaml.load(substitute(r.text, somewhere), Loader=Yaml12Loader)) for r in map(read_recipe, NAMES)]
    methods = [data["merge_method"] for kind, data in recipes if kind == "merge"]
    assert len(methods) >= 40 and set(method_names()) <= set(methods)
    gate_modes = [data.get("gate_mode", "hidden") for kind, data in recipes if kind == "moe"]
    assert len(gate_modes) >= 6 and {"random", "cheap_embed", "hidden"} <= set(gate_modes) <= set(GATE_MODES)


@pytest.mark.parametrize("name", cases(NAMES))
def test_recipe_runs_as_written(name, models, tmp_path, caplog):
    recipe = read_recipe(name)
    text = substitute(recipe.text, models)
    published = tmp_path / f"{name}.yml"
    published.write_text(text)

    # 1. it runs, and says which keys it ignores, where
    warnings = run(recipe.kind, published, tmp_path / "published", caplog)
    ignored = [w for w in warnings if IGNORED in w]
    assert sorted(located(w, published) for w in ignored) == sorted(recipe.ignored), ignored
    empty = [w for w in warnings if EMPTY_PROMPTS in w]
    assert len(empty) == recipe.empty_prompts, empty

    # 2. exactly as the config without those keys
    plain = tmp_path / "plain.yml"
    plain.write_text(without_ignored(text, recipe.ignored))
    assert not [w for w in run(recipe.kind, plain, tmp_path / "plain", caplog) if IGNORED in w]
    assert_same_model(tmp_path / "published", tmp_path / "plain")


# Strict mode reports the keys mergekit ignores before the parameters no method reads, and in
# an MoE config a key of an expert before a top-level key, so its error is not the earliest one
# in these files.


@pytest.mark.parametrize("name", cases([n for n in NAMES if read_recipe(n).ignored]))
def test_strict_fails_at_the_first_ignored_key(name, models, tmp_path, caplog):
    recipe = read_recipe(name)
    published = tmp_path / f"{name}.yml"
    published.write_text(substitute(recipe.text, models))
    with pytest.raises(ConfigError) as info:
        run(recipe.kind, published, tmp_path / "out", caplog, strict=True)
    message = str(info.value)
    line, key = recipe.ignored[0]
    assert info.value.line == line and re.split(r"[.\[]", info.value.key)[-1] == key, message
    assert message.startswith(f"{published}:{line}, key '{info.value.key}': ")
    assert "strict" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
