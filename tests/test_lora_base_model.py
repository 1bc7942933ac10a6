"""A LoRA adapter applied to a model other than the one it records (adapter_config.json's
``base_model_name_or_path``) is applied with a warning naming both; the same model spelled
another way (a local path, a hub id, a hub cache snapshot) is not warned about."""

from __future__ import annotations

import json
import logging
import shutil

import pytest


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    from mergekitty.lora import extract_lora

    out = tmp_path_factory.mktemp("adapter") / "ft1-lora"
    extract_lora(llama["ft1"], llama["base"], out, rank=4)
    return out


def _recording(adapter, tmp_path, recorded):
    """A copy of ``adapter`` whose config records ``recorded`` as its base model (None: no such key)."""
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg.pop("base_model_name_or_path", None)
    if recorded is not None:
        cfg["base_model_name_or_path"] = recorded
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize(
    "recorded",
    [
        None,
        "",
        "someone/base",  # a hub id whose name is the local directory's
        "/elsewhere/models/base/",  # another copy of it
        "/root/.cache/huggingface/hub/models--someone--base/snapshots/0123abcd",  # the hub cache's
        "SOMEONE/BASE",
    ],
)
def test_the_same_model_spelled_otherwise_is_not_warned_about(llama, adapter, tmp_path, recorded):
    from mergekitty.lora.adapter import Adapter

    lora = Adapter(_recording(adapter, tmp_path, recorded))
    assert lora.other_base_warning(str(llama["base"]), llama["base"]) is None


def test_the_same_directory_by_another_name_is_not_warned_about(llama, adapter, tmp_path):
    from mergekitty.lora.adapter import Adapter

    link = tmp_path / "my-base"
    link.symlink_to(llama["base"], target_is_directory=True)
    lora = Adapter(_recording(adapter, tmp_path, str(link)))
    assert lora.other_base_warning(str(llama["base"]), llama["base"]) is None


def test_another_model_is_warned_about_naming_both(llama, adapter, tmp_path):
    from mergekitty.lora.adapter import Adapter

    lora = Adapter(_recording(adapter, tmp_path, "meta-llama/Llama-3.1-8B"), label="my-adapter")
    message = lora.other_base_warning(str(llama["ft2"]), llama["ft2"])
    assert message is not None
    assert f"LoRA adapter my-adapter was made for 'meta-llama/Llama-3.1-8B', not '{llama['ft2']}'" in message


def test_model_plus_lora_in_a_config_warns_at_its_key_and_line(llama, adapter, tmp_path, write_yaml, caplog):
    from mergekitty import plan_merge

    lora = _recording(adapter, tmp_path, "meta-llama/Llama-3.1-8B")
    cfg = write_yaml(
        f"merge_method: linear\nmodels:\n  - model: {llama['ft2']}\n  - model: {llama['base']}+{lora}\n"
        "parameters: {weight: 0.5}\n"
    )
    with caplog.at_level(logging.WARNING, logger="mergekitty"):
        plan_merge(cfg)
    (message,) = [r.getMessage() for r in caplog.records if "was made for" in r.getMessage()]
    assert message.startswith(f"{cfg}:4, key 'models[1].model': LoRA adapter ")
    assert f"made for 'meta-llama/Llama-3.1-8B', not '{llama['base']}'" in message
    caplog.clear()
    same = write_yaml(f"merge_method: passthrough\nmodels:\n  - model: {llama['base']}+{adapter}\n", "same.yml")
    with caplog.at_level(logging.WARNING, logger="mergekitty"):
        plan_merge(same)  # the extracted adapter records this very base
    assert not [r for r in caplog.records if "was made for" in r.getMessage()]


def test_merge_lora_warns_on_stderr_unless_quiet(llama, adapter, tmp_path, capsys):
    from mergekitty.cli.merge_lora import main

    lora = _recording(adapter, tmp_path, "meta-llama/Llama-3.1-8B")
    args = [str(llama["ft2"]), str(lora), str(tmp_path / "out"), "--dry-run"]
    main(args, standalone_mode=False)
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: LoRA adapter {lora} was made for 'meta-llama/Llama-3.1-8B', not '{llama['ft2']}'" in err
    main([*args, "-q"], standalone_mode=False)
    assert capsys.readouterr().err == ""
