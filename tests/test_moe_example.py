"""The README's MoE worked example: examples/moe/tiny-moe.yml on the tiny models generator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import run_cli

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "moe" / "tiny-moe.yml"


def test_tiny_moe_example_builds_and_routes(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_cli(sys.executable, "-m", "mergekitty.tiny_models", "tiny-models", cwd=tmp_path)
    proc = run_cli("mergekitty-moe", EXAMPLE, "tiny-moe", cwd=tmp_path)
    assert "MixtralForCausalLM with 4 experts" in proc.stderr
    out = tmp_path / "tiny-moe"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2 and cfg["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok("w3 w4 w5", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert "gate_mode: hidden" in (out / "mergekitty_moe_config.yml").read_text()
