"""MERGEKITTY_PORTABLE_IO=1 makes the native module use the IO of platforms without Linux's fast
paths (positioned writes without O_DIRECT, early writeback or madvise). A merge through it
writes the same bytes, file for file, as a merge through the fast paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_yaml
from mergekitty import _native

pytestmark = pytest.mark.slow  # a tiny model family and two merges in a child interpreter: seconds

# Several shards and an index; the MLP weights (2 MiB each in float32) are large enough for the
# fast path to write their aligned interiors with O_DIRECT.
SHARD = "3M"

CONFIGS = {
    "linear": """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.7}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.8, density: 0.5}}
dtype: float32
""",
}

# One interpreter runs every merge with the switch set, then says which IO it used.
_PORTABLE_RUN = """
import sys
from mergekitty import _native
from mergekitty.cli.yaml_cmd import main
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([config, out, "--quiet", "--out-shard-size", "{shard}"], standalone_mode=False)
print("io_mode", _native.io_mode())
"""


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    from mergekitty.tiny_models import make_family

    root = tmp_path_factory.mktemp("portable-io")
    base, ft1, ft2 = make_family(
        root / "models", "llama", 2, hidden_size=256, intermediate_size=2048, num_hidden_layers=1
    )
    paths = {}
    for method, text in CONFIGS.items():
        paths[method] = root / f"{method}.yml"
        paths[method].write_text(text.format(base=base, ft1=ft1, ft2=ft2))
    return paths


@pytest.fixture(scope="module")
def portable_outputs(configs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("portable-out")
    # named as the other run's output: the model card's title is the directory's name
    outs = {method: root / method / "out" for method in configs}
    env = {k: v for k, v in os.environ.items() if k != "MERGEKITTY_NO_DIRECT_IO"}
    env["MERGEKITTY_PORTABLE_IO"] = "1"
    args = [str(p) for method in configs for p in (configs[method], outs[method])]
    proc = subprocess.run(
        [sys.executable, "-c", _PORTABLE_RUN.format(shard=SHARD), *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "io_mode portable" in proc.stdout
    return outs


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_portable_io_writes_the_same_bytes_as_the_fast_paths(method, configs, portable_outputs, tmp_path):
    if _native.io_mode() != "native":
        pytest.skip("this process runs with MERGEKITTY_PORTABLE_IO set: there is no fast path to compare with")
    out = tmp_path / "out"
    run_yaml(configs[method], out, "--out-shard-size", SHARD)
    fast, portable = files_of(out), files_of(portable_outputs[method])
    assert sum(name.endswith(".safetensors") for name in fast) > 2
    assert "model.safetensors.index.json" in fast
    assert sorted(fast) == sorted(portable)
    for name in fast:
        assert fast[name] == portable[name], f"{name} differs between the fast and the portable IO"
