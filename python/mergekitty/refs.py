"""Model references (``path@revision+lora_path@revision``) and where they live on disk.

A reference names a local directory or a Hugging Face Hub repository, optionally at
a revision, optionally with a LoRA adapter on top. Parsing is pure; only
``resolve_local_path`` touches the file system (and, for hub ids, the network).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from .errors import InvalidArgumentError, ModelNotFoundError

__all__ = ["ModelPath", "ModelReference", "parse_model_path", "looks_local", "resolve_local_path", "HUB_ALLOW_PATTERNS"]

# Files fetched from the hub for a model. "*.safetensors" is swapped for "*.bin" when the
# repository has no safetensors weights.
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja")
# Fetched for a model whose tokenizer alone is used (a tokenizer source that is not merged).
HUB_TOKENIZER_PATTERNS = ("*.json", "tokenizer.model", "*.txt", "*.jinja")


def parse_model_path(value: str) -> dict[str, Any]:
    """Split ``path[@revision]`` into ``{"path": ..., "revision": ...}``; ValueError if malformed."""
    if value.count("@") > 1:
        raise InvalidArgumentError(f"invalid model path '{value}': more than one '@' (use path@revision)")
    path, _, revision = value.partition("@")
    if not path.strip():
        raise InvalidArgumentError(f"invalid model path '{value}': the path is empty")
    if "@" in value and not revision.strip():
        raise InvalidArgumentError(f"invalid model path '{value}': the revision after '@' is empty")
    return {"path": path, "revision": revision or None}


class ModelPath(BaseModel):
    """A local directory or hub repository id, with an optional revision."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_model_path(value)
        if not isinstance(value, (dict, ModelPath)):
            raise InvalidArgumentError(f"a model path must be a string, got {value!r}")
        return value

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


class ModelReference(BaseModel):
    """A model: ``path[@revision][+lora_path[@revision]]``, or the dict form
    ``{model: {path, revision}, lora: {path, revision}, override_architecture}``.

    Frozen and hashable; two references are equal when every field is equal.
    ``str(ref)`` gives the string form back.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelPath
    lora: ModelPath | None = None
    override_architecture: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = value.split("+")
            if len(parts) > 2:
                raise InvalidArgumentError(
                    f"cannot parse model reference '{value}': more than one '+' (use model+lora)"
                )
            out: dict[str, Any] = {"model": parse_model_path(parts[0])}
            if len(parts) == 2:
                out["lora"] = parse_model_path(parts[1])
            return out
        if not isinstance(value, (dict, ModelReference)):
            raise InvalidArgumentError(f"a model reference must be a path or hub id (a string), got {value!r}")
        return value

    @classmethod
    def parse(cls, value: str) -> ModelReference:
        """Parse the string form; ValueError (not a pydantic error) if malformed."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise InvalidArgumentError(msg.removeprefix("Value error, ")) from None

    @property
    def path(self) -> str:
        return self.model.path

    @property
    def revision(self) -> str | None:
        return self.model.revision

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora is not None else str(self.model)

    def __repr__(self) -> str:
        return f"ModelReference({str(self)!r})"

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Any) -> Any:
        text = str(self)
        if self.override_architecture is None and '"' not in text and " " not in text:
            return text
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def looks_local(path: str) -> bool:
    """True if ``path`` is meant as a directory rather than a hub id ``org/name``."""
    return (
        path.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or path in (".", "..")
        or path.count("/") > 1
        or "\\" in path
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_local_path(
    ref_path: str, revision: str | None = None, cache_dir: str | None = None, tokenizer_only: bool = False
) -> Path:
    """The local directory holding ``ref_path``, downloading it from the hub if needed
    (``tokenizer_only``: its tokenizer and config files, no weights).

    An existing directory is returned as is. A path that looks local but does not exist
    raises ModelNotFoundError without touching the network; anything else is tried as a
    hub repository id (HF_HUB_OFFLINE is honoured: only the local cache is used).
    """
    local = Path(ref_path).expanduser()
    try:
        if local.is_dir():
            return local
        exists = local.exists()
    except OSError as exc:  # a name too long, a directory on the way that cannot be searched...
        raise ModelNotFoundError(f"model path {ref_path} cannot be used: {exc.strerror or exc}") from None
    if exists:
        raise ModelNotFoundError(f"model path is not a directory: {ref_path}")
    if looks_local(ref_path):
        raise ModelNotFoundError(f"model directory not found: {ref_path}{_sibling_hint(local)}")
    if local.parent != Path(".") and _is_dir(local.parent):
        # "models/llama-ft" where ./models exists is a local path with a typo, not a hub id
        raise ModelNotFoundError(
            f"model directory not found: {ref_path} ({local.parent} exists locally, so this is not taken "
            f"as a hub id){_sibling_hint(local)}"
        )
    return _download(ref_path, revision, cache_dir, tokenizer_only)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _sibling_hint(path: Path) -> str:
    import difflib

    try:
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f"; did you mean '{path.parent / close[0]}'?" if close else ""


def _download(repo_id: str, revision: str | None, cache_dir: str | None, tokenizer_only: bool = False) -> Path:
    label = f"{repo_id}@{revision}" if revision else repo_id
    offline = _offline()
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"model '{label}' is not a local directory, and huggingface_hub is not installed to download it"
        ) from None

    import logging

    # one clear error instead of a screen of retry warnings when the hub is unreachable
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        if tokenizer_only:
            patterns = list(HUB_TOKENIZER_PATTERNS)
        else:
            patterns = list(HUB_ALLOW_PATTERNS)
            if not offline:
                files = huggingface_hub.list_repo_files(repo_id, repo_type="model", revision=revision)
                if not any(f.lower().endswith(".safetensors") for f in files):
                    patterns[patterns.index("*.safetensors")] = "*.bin"
            else:
                patterns.append("*.bin")
        path = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except Exception as exc:  # hub, network, validation and cache errors all mean "not found"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mode = " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if offline else ""
        raise ModelNotFoundError(
            f"model '{label}' is neither a local directory nor downloadable from the Hugging Face Hub{mode}: {reason}"
        ) from None
    return Path(path)
