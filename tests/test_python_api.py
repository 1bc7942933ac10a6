"""The top-level Python API: every entry point is reachable from ``import mergekitty``
without importing torch until one is used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_entry_points_are_the_implementations():
    import mergekitty
    from mergekitty import api, lora, moe

    assert mergekitty.plan_merge is api.plan_merge and mergekitty.MergeOptions is api.MergeOptions
    assert mergekitty.extract_lora is lora.extract_lora and mergekitty.merge_lora is lora.merge_lora
    assert mergekitty.build_moe is moe.build_moe and mergekitty.MoEOptions is moe.MoEOptions
    for name in mergekitty.__all__:
        assert getattr(mergekitty, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'merge_loras'"):
        mergekitty.merge_loras  # noqa: B018


def test_import_stays_light():
    code = "import sys, mergekitty; mergekitty.__all__; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
