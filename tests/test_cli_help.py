"""``--help`` of every command: exactly the options the command uses, names never broken however
narrow the terminal, and the old no-op options named once at the end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib.metadata import version

import pytest

COMMON = {"--quiet", "--no-quiet", "--verbose", "--help"}
DEVICE_ALIASES = ("--[no-]cuda", "--compute-device", "--gpu-rich")
MERGE_LEGACY = (
    "--[no-]lazy-unpickle", "--[no-]clone-tensors", "--low-cpu-memory", "--read-to-gpu", "--[no-]load-to-compute",
    "--storage-device", "--multi-gpu", "--[no-]async-write", "--write-threads", "--executor", "--lora-merge-cache",
    "--[no-]safe-serialization", "--[no-]trust-remote-code",
)  # fmt: skip
INPUTS = {
    "--strict", "--allow-crimes", "--no-allow-crimes", "--layout-override", "--random-seed", "--lora-merge-dtype",
    "--transformers-cache",
}  # fmt: skip
MERGE = {
    *COMMON, *INPUTS, "--version", "--device", "--threads", "--num-threads", "--out-shard-size", "--copy-tokenizer",
    "--no-copy-tokenizer", "--write-model-card", "--no-write-model-card", "--allow-nonfinite", "--json", "--dry-run",
    "--write-intermediates",
}  # fmt: skip

# command line -> (the long options it lists, the old options its last lines name)
EXPECTED: dict[tuple[str, ...], tuple[set[str], tuple[str, ...]]] = {
    ("mergekitty-yaml",): (MERGE, DEVICE_ALIASES + MERGE_LEGACY),
    ("mergekitty", "merge"): (MERGE - {"--version"}, DEVICE_ALIASES + MERGE_LEGACY),
    # plan reads no weights and writes no model: no threads, tokenizer, card or health options
    ("mergekitty", "plan"): ({*COMMON, *INPUTS, "--device", "--out-shard-size", "--json"}, ()),
    # merge-lora: one model, no config: none of the config, seed or dtype options
    ("mergekitty-merge-lora",): (
        {
            *COMMON,
            "--version",
            "--device",
            "--transformers-cache",
            "--out-shard-size",
            "--copy-tokenizer",
            "--no-copy-tokenizer",
            "--write-model-card",
            "--no-write-model-card",
            "--dry-run",
        },
        DEVICE_ALIASES
        + MERGE_LEGACY
        + ("--threads", "--num-threads", "--[no-]allow-crimes", "--random-seed", "--lora-merge-dtype"),
    ),  # fmt: skip
    # layershuffle: every merge option, with the options that draw the config
    ("mergekitty", "layershuffle"): (
        (MERGE - {"--write-intermediates"})
        | {"--model", "--weight", "--full-random", "--fp16", "--print-yaml", "--write-yaml"},
        DEVICE_ALIASES + MERGE_LEGACY,
    ),
    # the recipe commands: every merge option, and each tool's own
    ("mergekitty-mega",): (MERGE | {"--force", "--require-nameless"}, DEVICE_ALIASES + MERGE_LEGACY),
    ("mergekitty", "multi"): (
        MERGE | {"--out-path", "--intermediate-dir", "--lazy", "--no-lazy"},
        DEVICE_ALIASES + MERGE_LEGACY,
    ),
    # fill-missing: two models and a name mapping; nothing is computed, so no device
    ("mergekitty", "fill-missing"): (
        {
            *COMMON,
            "--version",
            "--prefix",
            "--partial",
            "--transformers-cache",
            "--out-shard-size",
            "--write-model-card",
            "--no-write-model-card",
            "--dry-run",
        },
        (),
    ),  # fmt: skip
    # pytorch: state dicts without config.json: no tokenizer, card, architecture or download options
    ("mergekitty", "pytorch"): (
        {
            *COMMON,
            "--version",
            "--tensor-intersection",
            "--tensor-union",
            "--device",
            "--threads",
            "--num-threads",
            "--strict",
            "--random-seed",
            "--out-shard-size",
            "--allow-nonfinite",
            "--json",
            "--dry-run",
        },
        DEVICE_ALIASES
        + MERGE_LEGACY
        + (
            "--[no-]copy-tokenizer",
            "--[no-]write-model-card",
            "--[no-]allow-crimes",
            "--lora-merge-dtype",
            "--transformers-cache",
        ),
    ),  # fmt: skip
    ("mergekitty-moe",): (
        {
            *COMMON,
            "--version",
            "--device",
            "--batch-size",
            "--strict",
            "--random-seed",
            "--trust-remote-code",
            "--no-trust-remote-code",
            "--allow-untrained",
            "--out-shard-size",
            "--copy-tokenizer",
            "--no-copy-tokenizer",
        },
        ("--i-understand-this-is-not-useful-without-training", "--load-in-4bit", "--load-in-8bit"),
    ),  # fmt: skip
    ("mergekitty", "tokensurgeon"): (
        {
            *COMMON,
            "--version",
            "--approximation-method",
            "--k",
            "--weight-scheme",
            "--barycentric",
            "--no-barycentric",
            "--cosine-similarity",
            "--no-cosine-similarity",
            "--batch-size",
            "--allow-crimes",
            "--no-allow-crimes",
            "--transformers-cache",
            "--out-shard-size",
        },
        MERGE_LEGACY + ("--device",),
    ),
    ("mergekitty-extract-lora",): (
        {
            *COMMON,
            "--version",
            "--model",
            "--base-model",
            "--out-path",
            "--trust-remote-code",
            "--no-trust-remote-code",
            "--transformers-cache",
            "--rank",
            "--max-rank",
            "--sv-epsilon",
            "--energy",
            "--distribute-scale",
            "--no-distribute-scale",
            "--device",
            "--embed-lora",
            "--no-embed-lora",
            "--extend-vocab",
            "--save-module",
            "--include-regex",
            "--exclude-regex",
            "--skip-undecomposable",
            "--model-name",
            "--model_name",
        },
        ("--[no-]lazy-unpickle",),
    ),  # fmt: skip
}

# a row of an option panel: "│ --name[, --other]  -x  METAVAR  help" (names in the first column)
ROW = re.compile(r"^│ (--?[\w-]+(?:, --?[\w-]+)*)")


def _help(command: tuple[str, ...], columns: int) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb", "NO_COLOR": "1"}
    exe = shutil.which(command[0]) or command[0]
    proc = subprocess.run([exe, *command[1:], "--help"], capture_output=True, text=True, env=env, check=True)
    return proc.stdout


@pytest.mark.parametrize("columns", [60, 80])
@pytest.mark.parametrize("command", list(EXPECTED), ids=" ".join)
def test_help_lists_what_the_command_uses_with_whole_names(command, columns):
    text = _help(command, columns)
    listed, epilog = _split(text)
    assert all(len(line) <= columns for line in text.splitlines()), text
    expected, legacy = EXPECTED[command]
    # every name in the names column is whole: a name broken across lines would not be in the set
    assert listed == expected, (sorted(listed - expected), sorted(expected - listed), text)
    words = epilog.split()
    for old in legacy:  # each old option named once, in the last lines
        assert sum(w.strip(",.:") == old for w in words) == 1, (old, epilog)
        assert old.replace("[no-]", "") not in listed
    assert ("old spellings of --device" in " ".join(words)) == bool(set(legacy) & set(DEVICE_ALIASES))
    assert text.split()[-2:] == ["mergekitty", version("mergekitty")]  # which tool this is, last


def _split(text: str) -> tuple[set[str], str]:
    """The long option names listed in the panels, and the text after the last panel."""
    names: set[str] = set()
    lines = text.splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("╰"))
    for line in lines[:last]:
        m = ROW.match(line)
        if m:
            names |= {n for n in m.group(1).split(", ") if n.startswith("--")}
    return names, "\n".join(lines[last + 1 :])


def test_old_options_still_run_and_say_they_do_nothing(llama, tmp_path, write_yaml, capsys):
    """The hidden options of older command lines are accepted, with a note each (but not under -q)."""
    from mergekitty.cli.merge_lora import main as merge_lora
    from mergekitty.cli.yaml_cmd import main as yaml_cmd

    cfg = write_yaml(f"merge_method: passthrough\nmodels:\n  - model: {llama['ft1']}\n")
    yaml_cmd([str(cfg), str(tmp_path / "a"), "--dry-run", "--trust-remote-code", "--no-safe-serialization",
              "--write-threads", "2", "--cuda", "--device", "cpu"], standalone_mode=False)  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert "--trust-remote-code has no effect" in err and "--no-safe-serialization has no effect" in err
    assert "--write-threads has no effect" in err
    with pytest.raises(SystemExit) as exit_:
        merge_lora([str(llama["base"]), str(tmp_path / "no-adapter"), str(tmp_path / "b"), "-j", "4",
                    "--random-seed", "1", "-q"], standalone_mode=False)  # fmt: skip
    assert exit_.value.code == 1  # the missing adapter, and nothing about the ignored options
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and "no-adapter" in line
