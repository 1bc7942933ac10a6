"""What the commands print where: what a command is asked for on stdout, in whole lines; notes,
warnings and progress on stderr."""

from __future__ import annotations

import os
import shutil
import subprocess


def test_plan_goes_to_stdout_in_whole_lines(llama, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\ndype: float16\n"
    )
    # as in a pipe: no terminal and no COLUMNS (rich would then wrap at 80 columns)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    exe = shutil.which("mergekitty") or "mergekitty"
    proc = subprocess.run([exe, "plan", str(cfg)], capture_output=True, text=True, env=env, check=True)
    out = proc.stdout.splitlines()
    assert out[0] == "method: linear"
    # a line longer than 80 columns stays one line when stdout is a file or a pipe
    (memory,) = [line for line in out if line.startswith("peak memory estimate:")]
    assert memory.endswith("resident (page cache)") and len(memory) > 80
    # the warning about the ignored key and the note about the differences are not in the plan
    assert "dype" not in proc.stdout and "documented difference" not in proc.stdout
    assert "'dype'" in proc.stderr and "documented difference" in proc.stderr


def test_every_command_says_which_version_of_this_project_it_is():
    from importlib.metadata import version

    for command in (
        "mergekitty",
        "mergekitty-yaml",
        "mergekitty-moe",
        "mergekitty-extract-lora",
        "mergekitty-merge-lora",
    ):
        proc = subprocess.run(
            [shutil.which(command) or command, "--version"], capture_output=True, text=True, check=True
        )
        assert proc.stdout.strip() == f"mergekitty {version('mergekitty')}", command


def test_model_cards_name_this_project_and_its_version(llama, tmp_path):
    """The card says which tool and version made the model, and links to no other project."""
    from importlib.metadata import version

    from mergekitty import run_merge
    from mergekitty.card import made_with

    run_merge(f"merge_method: passthrough\nmodels:\n  - model: {llama['ft1']}\n", tmp_path / "out", quiet=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"made with mergekitty {version('mergekitty')}." in card
    assert "github.com" not in card
    assert made_with("mergekitty-merge-lora") == f"mergekitty {version('mergekitty')} (`mergekitty-merge-lora`)"
