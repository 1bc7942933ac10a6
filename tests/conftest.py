import math
import os
import tempfile
from pathlib import Path

import pytest

from helpers import run_cli  # noqa: F401  (test modules import it from here too)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# recipe stages keep their side files in a cache: one of the test run's own, never the user's
os.environ.setdefault("MERGEKITTY_CACHE", tempfile.mkdtemp(prefix="mergekitty-test-cache-"))


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


# ------------------------------------------------------------------------------------ markers
# `slow`, `gpu` and `faults` are declared in pyproject.toml; the default selection leaves out
# `slow` and `gpu` (docs/development.md). Tests carry their marks as decorators or as a module's
# `pytestmark`, except those named below, which are marked here at collection; moving a mark into
# its module means deleting its line here.

# A parametrized case whose `shape` (or element count `n`) has this many elements or more is slow.
LARGE_ELEMENTS = 100_000

MARKED_BY_NAME = {
    "slow": {
        "test_cli_errors.py::test_layer_range_beyond_the_model",
        "test_cli_errors.py::test_local_looking_typo_does_not_go_to_the_hub",
        "test_cli_errors.py::test_no_effect_options_are_accepted_and_explained",
        "test_e2e.py::test_differing_integer_tensors_give_a_clear_error",
        "test_e2e.py::test_integer_and_other_dtypes_pass_through",
        "test_e2e.py::test_sharded_output_and_sharded_and_bin_inputs",
        # sweeps of the fused GTA kernel over method x dtype x shape x density (the fast selection
        # keeps the per-kernel parity tests and the executor's native-against-torch merges)
        "test_gta_fused.py::test_fused_matches_unfused",
        "test_lora.py::test_adapter_for_another_model_is_a_shape_error",
        "test_lora.py::test_adaptive_rank_from_energy_and_sv_epsilon",
        "test_lora.py::test_cli_help_is_fast_to_import",
        "test_lora.py::test_embed_lora_factors_embeddings",
        "test_lora.py::test_extended_vocab_rows_are_dropped_by_default",
        "test_lora.py::test_extended_vocab_rows_are_kept_with_extend_vocab",
        "test_lora.py::test_extract_cli_spellings",
        "test_lora.py::test_lora_merge_dtype_rounds_the_adapted_model",
        "test_lora.py::test_low_rank_adapter_logits_are_between_base_and_finetune",
        "test_lora.py::test_model_plus_lora_cli_with_lora_merge_cache",
        "test_lora.py::test_model_plus_lora_reference_equals_merging_the_merged_model",
        "test_lora.py::test_model_plus_lora_with_added_tokens_brings_its_tokenizer",
        "test_lora.py::test_reconstruction_error_matches_the_best_rank_k_and_falls_with_rank",
        "test_lora.py::test_tied_embeddings_and_biases",
        "test_moe.py::test_batching_and_padding_do_not_change_the_gates",
        "test_moe.py::test_cli_builds_and_loads",
        "test_moe.py::test_cli_config_errors_are_one_clear_line",
        "test_moe.py::test_cli_random_gates_report_their_seed",
        "test_moe.py::test_hidden_avg_and_negative_prompts",
        "test_moe.py::test_hidden_gates_route_each_experts_prompts_to_it",
        "test_moe.py::test_model_plus_lora_experts_and_base",
        "test_moe_deepseek.py::test_cli_says_how_to_load_it",
        "test_moe_example.py::test_tiny_moe_example_builds_and_routes",
        "test_native_kernels.py::test_gta_merge_is_bit_identical_to_the_unfused_kernels",
    },
    "faults": {
        "test_cli_errors.py::test_interrupted_merge_leaves_nothing_that_looks_complete",
        "test_cli_errors.py::test_killed_merge_leaves_nothing_that_looks_complete",
        "test_lora.py::test_interrupted_merge_leaves_no_model",
        "test_native.py::test_shard_writer_drop_cleans_up",
    },
}


def _large(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for name, value in callspec.params.items():
        if name == "shape" and isinstance(value, tuple) and all(isinstance(d, int) for d in value):
            if math.prod(value) >= LARGE_ELEMENTS:
                return True
        elif name == "n" and isinstance(value, int) and value >= LARGE_ELEMENTS:
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        for mark, names in MARKED_BY_NAME.items():
            if name in names:
                item.add_marker(mark)
        if _large(item):
            item.add_marker("slow")
