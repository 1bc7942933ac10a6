"""Model references: parsing, round-trips, and resolving to a local directory (no network)."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ValidationError

from mergekitty.errors import ModelNotFoundError
from mergekitty.refs import ModelPath, ModelReference, looks_local, resolve_local_path


@pytest.mark.parametrize(
    "text, path, revision, lora_path, lora_revision",
    [
        ("org/model", "org/model", None, None, None),
        ("org/model@main", "org/model", "main", None, None),
        ("/abs/dir", "/abs/dir", None, None, None),
        ("org/model+org/lora", "org/model", None, "org/lora", None),
        ("org/model@v1+org/lora@abc123", "org/model", "v1", "org/lora", "abc123"),
        ("./local+./adapter@r", "./local", None, "./adapter", "r"),
    ],
)
def test_parse_and_round_trip(text, path, revision, lora_path, lora_revision):
    ref = ModelReference.parse(text)
    assert ref.path == path and ref.model.path == path
    assert ref.revision == revision
    if lora_path is None:
        assert ref.lora is None
    else:
        assert ref.lora == ModelPath(path=lora_path, revision=lora_revision)
    assert str(ref) == text
    assert ModelReference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a+b+c", "more than one '+'"),
        ("a@b@c", "more than one '@'"),
        ("a+b@c@d", "more than one '@'"),
        ("", "empty"),
        ("@rev", "empty"),
        ("model@", "revision"),
    ],
)
def test_parse_errors_are_value_errors(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        ModelReference.parse(text)
    assert not isinstance(info.value, ValidationError)


def test_dict_form_and_override_architecture():
    ref = ModelReference.model_validate(
        {
            "model": {"path": "org/m", "revision": "r1"},
            "lora": {"path": "org/l"},
            "override_architecture": "LlamaForCausalLM",
        }
    )
    assert ref.path == "org/m" and ref.revision == "r1" and ref.lora.path == "org/l"
    assert ref.override_architecture == "LlamaForCausalLM"
    assert str(ref) == "org/m@r1+org/l"
    dumped = ref.model_dump(mode="json")
    assert isinstance(dumped, dict) and dumped["override_architecture"] == "LlamaForCausalLM"
    assert ModelReference.model_validate(dumped) == ref
    # the dict form also accepts the string form of a path
    assert ModelReference.model_validate({"model": "org/m@r1"}) == ModelReference.parse("org/m@r1")


def test_serializes_as_string():
    assert ModelReference.parse("org/m@r").model_dump(mode="json") == "org/m@r"
    spaced = ModelReference.parse("/dir with space/m")
    assert isinstance(spaced.model_dump(mode="json"), dict)


def test_frozen_hashable_and_usable_as_field():
    a = ModelReference.parse("org/m")
    b = ModelReference.parse("org/m")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ModelReference.parse("org/m@main")
    with pytest.raises(ValidationError):
        a.model = ModelPath(path="x")  # type: ignore[misc]

    class Holder(BaseModel):
        ref: ModelReference

    assert Holder(ref="org/m").ref == a
    with pytest.raises(ValidationError):
        Holder(ref=5)
    with pytest.raises(ValidationError):
        Holder(ref={"model": {"path": "x"}, "bogus": 1})


def test_looks_local():
    for p in ("/a", "./a", "../a", "~/a", "a/b/c", ".", ".."):
        assert looks_local(p), p
    for p in ("org/name", "gpt2"):
        assert not looks_local(p), p


def test_resolve_existing_directory(tmp_path, monkeypatch):
    d = tmp_path / "model"
    d.mkdir()
    assert resolve_local_path(str(d), None) == d
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_local_path("~/model", "main") == d
    monkeypatch.chdir(tmp_path)
    assert resolve_local_path("model", None).resolve() == d.resolve()


def test_resolve_missing_local_path(tmp_path):
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(ModelNotFoundError, match="model directory not found: " + missing):
        resolve_local_path(missing, None)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_local_path("./definitely-missing-dir", None)


def test_resolve_file_is_not_a_model(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_local_path(str(f), None)


def test_resolve_hub_id_offline(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_local_path("no-such-org-xyz/no-such-model-xyz", "main", cache_dir=str(tmp_path / "cache"))
    msg = str(info.value)
    assert "no-such-org-xyz/no-such-model-xyz@main" in msg
    assert "neither a local directory nor downloadable" in msg
