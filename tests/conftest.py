import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _family(root: Path, arch: str, **overrides):
    from mergekitty.tiny_models import make_family

    target = root / arch
    if not (target / "ft3" / "config.json").exists():
        make_family(target, arch, 3, **overrides)
    return {"base": target / "base", "ft1": target / "ft1", "ft2": target / "ft2", "ft3": target / "ft3"}


@pytest.fixture(scope="session")
def llama(family_root):
    return _family(family_root, "llama")


@pytest.fixture(scope="session")
def mistral(family_root):
    return _family(family_root, "mistral")


@pytest.fixture(scope="session")
def qwen2(family_root):
    """Qwen2 with tied embeddings: the checkpoints have no lm_head.weight."""
    return _family(family_root, "qwen2")


def run_cli(*args, check=True, cwd=None):
    """Run a console script of the installed package; returns the CompletedProcess."""
    exe = shutil.which(args[0]) or args[0]
    proc = subprocess.run(
        [exe, *map(str, args[1:])], capture_output=True, text=True, cwd=cwd, env={**os.environ, "COLUMNS": "200"}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str, name: str = "config.yml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def python_exe():
    return sys.executable
