"""How much the commands say: -q errors only, the default, -v (plan summary, phase times and
bytes), -vv (a line per tensor with its kernel); all of it on stderr, stdout only what a
command is asked to print."""

from __future__ import annotations

import logging
import re

import pytest

from helpers import read_state


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """``mergekitty ARGS`` in this process: (exit code, stdout, stderr)."""
    from mergekitty.cli.main import group

    code: int | str | None = 0
    try:
        group(list(map(str, args)), standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


@pytest.fixture
def linear(llama, write_yaml):
    return write_yaml(
        f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {llama['ft2']}\n    parameters: {{weight: 0.5}}\n"
    )


def _tensor_bytes(path) -> int:
    return sum(t.numel() * t.element_size() for t in read_state(path).values())


def test_quiet_clean_merge_prints_nothing(linear, tmp_path, capsys):
    code, out, err = _run(capsys, "merge", linear, tmp_path / "out", "-q")
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / "out" / "config.json").is_file()


def test_quiet_still_prints_the_error(llama, tmp_path, write_yaml, capsys):
    cfg = write_yaml(f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n  - model: {tmp_path / 'nowhere'}\n")
    code, out, err = _run(capsys, "merge", cfg, tmp_path / "out", "--quiet")
    assert code == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "key 'models[1].model'" in line and "nowhere" in line


def test_quiet_silences_warnings(llama, tmp_path, write_yaml, capsys):
    """An ignored key is a warning: shown by default, left out under -q."""
    cfg = write_yaml(
        f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n  - model: {llama['ft2']}\n"
        "parameters: {weight: 0.5}\ndype: float16\n"
    )
    code, _, err = _run(capsys, "merge", cfg, tmp_path / "loud")
    assert code == 0 and "warning:" in err and "'dype'" in err and "done:" in err
    code, out, err = _run(capsys, "merge", cfg, tmp_path / "quiet", "-q")
    assert (code, out, err) == (0, "", "")


def test_default_prints_the_health_and_result_but_no_phases(linear, tmp_path, capsys):
    code, out, err = _run(capsys, "merge", linear, tmp_path / "out")
    n = len(read_state(tmp_path / "out"))
    assert code == 0 and out == ""
    assert f"health: {n} tensors, no NaN/Inf" in err and f"done: merged model written to {tmp_path / 'out'}" in err
    assert "phase " not in err and "method: linear" not in err and "tensor model." not in err


def test_verbose_prints_the_summary_first_and_each_phase(llama, linear, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "merge", linear, out_dir, "-v")
    assert code == 0 and out == ""
    lines = err.splitlines()
    n = len(read_state(out_dir))
    # the plan summary, before the merge's own lines
    summary = lines.index("method: linear")
    assert lines[summary + 1] == f"model 0: {llama['ft1']}, 4 layers (donor)"
    assert f"tensors: {n} written, 0 left out" in lines
    assert summary < next(i for i, line in enumerate(lines) if line.startswith("health:"))
    # one line per phase, in order, then the total
    phases = [line for line in lines if line.startswith("phase ")]
    assert [p.split(":")[0] for p in phases] == ["phase plan", "phase tokenizer", "phase merge", "phase commit"]
    from mergekitty.sizes import format_size

    read = _tensor_bytes(llama["ft1"]) + _tensor_bytes(llama["ft2"])  # linear reads every tensor of both
    written = _tensor_bytes(out_dir)
    merge = phases[2]
    assert f"read {format_size(read)}" in merge and f"wrote {format_size(written)}" in merge
    # the side files (tokenizer, model card...): everything but the tensors and config.json (the commit's)
    side = sum(f.stat().st_size for f in out_dir.iterdir() if ".safetensors" not in f.name and f.name != "config.json")
    assert any(f.name == "tokenizer.json" for f in out_dir.iterdir())
    assert phases[1].endswith(f", wrote {format_size(side)}")
    assert all(re.search(r": \d+(\.\d+)? (ms|s)\b", p) for p in phases)
    assert any(line.startswith("total: ") for line in lines)


def test_very_verbose_names_every_tensor_and_its_kernel(linear, tmp_path, capsys):
    code, _, err = _run(capsys, "merge", linear, tmp_path / "out", "-vv")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("tensor ")]
    named = {}
    for line in lines:
        m = re.fullmatch(r"tensor (\S+): (\S+), \S+ \S+ read in \d+(\.\d+)? (ms|s)", line)
        assert m, line
        named[m.group(1)] = m.group(2)
    # every written tensor once; a linear merge of two float models is the native linear combination
    assert sorted(named) == sorted(read_state(tmp_path / "out")) and len(lines) == len(named)
    assert set(named.values()) == {"native.linear_combination"}
    assert "phase merge:" in err  # -vv includes -v


def test_plan_stdout_is_the_plan_alone(linear, tmp_path, capsys):
    code, out, err = _run(capsys, "plan", linear, "-q")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "method: linear"
    assert "merging" not in out and "\r" not in out and "\x1b" not in out
    code, out, _ = _run(capsys, "plan", linear, "--json", "-")
    import json

    assert code == 0 and json.loads(out)["__type__"] == "MergePlan"


def test_quiet_and_verbose_together_are_a_usage_error(linear, tmp_path, capsys):
    from mergekitty.cli.main import group

    with pytest.raises(Exception, match="contradict"):
        group(["merge", str(linear), str(tmp_path / "out"), "-q", "-v"], standalone_mode=False)


def test_a_command_run_in_process_leaves_logging_as_it_was(linear, tmp_path, capsys):
    package, root = logging.getLogger("mergekitty"), logging.getLogger()
    before = (package.level, root.level, list(root.handlers))
    _run(capsys, "merge", linear, tmp_path / "out", "-q")
    _run(capsys, "plan", linear, "-vv")
    assert (package.level, root.level, list(root.handlers)) == before


def test_every_command_takes_the_same_verbosity_flags():
    from mergekitty.cli.extract_lora import main as extract
    from mergekitty.cli.main import group
    from mergekitty.cli.merge_lora import main as merge_lora
    from mergekitty.cli.moe import main as moe
    from mergekitty.cli.yaml_cmd import main as yaml_cmd

    commands = [yaml_cmd, moe, extract, merge_lora, *group.commands.values()]
    for command in commands:
        flags = {o: p.name for p in command.params for o in [*p.opts, *p.secondary_opts]}
        assert flags["-q"] == flags["--quiet"] == flags["--no-quiet"] == "quiet", command.name
        assert flags["-v"] == flags["--verbose"] == "verbose", command.name
