"""Bad input gives one clear error line (exit 1), never a traceback, never a half-written output."""

import subprocess
import sys

import pytest

from conftest import run_cli


def _fails(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    for n in needles:
        assert n in text, text


def test_missing_model_path(tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {tmp_path}/does-not-exist
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    _fails(
        run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False),
        "does-not-exist",
        "config.yml:3, key 'models[0].model'",
    )
    assert not (tmp_path / "out").exists()


def test_missing_model_in_a_slice_names_its_key(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
slices:
  - sources:
      - model: {llama["ft1"]}
        layer_range: [0, 2]
  - sources:
      - model: {tmp_path}/gone
        layer_range: [1, 4]
merge_method: passthrough
""")
    _fails(
        run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False),
        "config.yml:7, key 'slices[1].sources[0].model'",
        "gone",
    )
    assert not (tmp_path / "out").exists()


def test_typo_in_yaml_key_suggests_the_right_one(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 1.0}}
merge_methd: linear
""")
    _fails(run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False), "merge_method", "5")


def test_misspelled_method(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 1.0}}
merge_method: lineer
""")
    _fails(run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False), "linear")


def test_missing_required_weight(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
  - model: {llama["ft2"]}
merge_method: linear
""")
    _fails(run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False), "weight")


def test_output_directory_that_is_an_input(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    before = sorted(p.name for p in llama["ft1"].iterdir())
    _fails(run_cli("mergekitty-yaml", cfg, llama["ft1"], check=False), "input model")
    assert sorted(p.name for p in llama["ft1"].iterdir()) == before


def test_malformed_safetensors_input(llama, tmp_path, write_yaml):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama["ft1"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = write_yaml(f"""
models:
  - model: {broken}
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    _fails(run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False), "model.safetensors")


def test_interrupted_merge_leaves_nothing_that_looks_complete(llama, tmp_path, write_yaml, monkeypatch):
    import mergekitty.execute as execute_mod
    from mergekitty import run_merge

    cfg = f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 1.0}}
  - model: {llama["ft2"]}
    parameters: {{weight: 1.0}}
merge_method: linear
"""
    calls = {"n": 0}
    real = execute_mod.run_job

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(execute_mod, "run_job", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_merge(cfg, out, quiet=True)
    # a new output: nothing appears, and nothing is left beside where it would have gone
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_killed_merge_leaves_nothing_that_looks_complete(llama, tmp_path, write_yaml):
    """SIGKILL mid-merge: no output directory appears; what is left beside it is hidden and the
    next run on that output removes it."""
    import os
    import signal
    import time

    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    out = tmp_path / "out"
    code = (
        "import mergekitty.execute as e, time\n"
        "real = e.run_job\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.05)\n"
        "    return real(*a, **k)\n"
        "e.run_job = slow\n"
        f"from mergekitty import run_merge\nrun_merge({str(cfg)!r}, {str(out)!r}, quiet=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(400):
        staging = tmp_path / ".out.mergekitty-staging"
        if staging.exists() and any(staging.glob(".*partial")):
            break
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != cfg)
    from mergekitty import run_merge

    run_merge(cfg.read_text(), out, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml", "out"]


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from mergekitty.cli.yaml_cmd import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--out-shard-size" in proc.stdout and "BYTES" in proc.stdout


def test_group_has_every_command_and_stays_light():
    code = (
        "import sys\n"
        "from mergekitty.cli.main import group\n"
        "try:\n    group(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for command in (
        "merge",
        "plan",
        "moe",
        "extract-lora",
        "merge-lora",
        "layershuffle",
        "mega",
        "multi",
        "fill-missing",
        "inspect",
    ):
        assert command in proc.stdout, proc.stdout
    # a subcommand is the stand-alone command: same options, same errors
    moe = run_cli("mergekitty", "moe", "--help")
    assert "--random-seed" in moe.stdout and "gate" in moe.stdout
    missing = run_cli(
        "mergekitty", "merge-lora", "/nonexistent/base", "/nonexistent/adapter", "/tmp/never-written", check=False
    )
    _fails(missing, "not found")


def test_no_effect_options_are_accepted_and_explained(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{weight: 1.0}}
merge_method: linear
""")
    proc = run_cli(
        "mergekitty-yaml",
        cfg,
        tmp_path / "out",
        "--lazy-unpickle",
        "--clone-tensors",
        "--cuda",
        "--dry-run",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--lazy-unpickle has no effect" in proc.stderr and "--clone-tensors has no effect" in proc.stderr


def test_misspelled_parameter_name_is_an_error(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
models:
  - model: {llama["ft1"]}
    parameters: {{wieght: 1.0}}
merge_method: linear
""")
    _fails(run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False), "weight", "wieght")


def test_layer_range_beyond_the_model(llama, tmp_path, write_yaml):
    cfg = write_yaml(f"""
slices:
  - sources:
      - model: {llama["ft1"]}
        layer_range: [0, 9]
merge_method: passthrough
""")
    _fails(run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False), "layer_range", "4 layers")


def test_local_looking_typo_does_not_go_to_the_hub(tmp_path, write_yaml):
    (tmp_path / "models" / "llama-ft").mkdir(parents=True)
    cfg = write_yaml("""
models:
  - model: models/llama-fx
    parameters: {weight: 1.0}
merge_method: linear
""")
    proc = run_cli("mergekitty-yaml", cfg, tmp_path / "out", check=False, cwd=tmp_path)
    _fails(proc, "models/llama-fx", "models/llama-ft")
