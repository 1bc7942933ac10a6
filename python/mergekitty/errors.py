"""The one exception tree of mergekitty.

Every error a user can cause (a bad config, a missing model, a malformed file)
is a subclass of ``MergekittyError``; the CLI prints these as one clear message
instead of a traceback.
"""

from __future__ import annotations


class MergekittyError(Exception):
    """Base class of every error mergekitty raises on purpose."""


class ConfigError(MergekittyError):
    """The YAML config is wrong. ``key`` is a dotted path, ``line`` 1-based."""

    def __init__(self, message: str, key: str | None = None, line: int | None = None, source: str | None = None):
        self.key = key
        self.line = line
        self.source = source
        self.detail = message
        where = []
        if source:
            where.append(f"{source}" + (f":{line}" if line else ""))
        elif line:
            where.append(f"line {line}")
        if key:
            where.append(f"key '{key}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelNotFoundError(MergekittyError):
    """A model reference names neither a local directory nor a reachable hub repository."""


class ModelFormatError(MergekittyError):
    """A checkpoint on disk is malformed or unreadable (bad safetensors header, broken index...)."""


class ArchitectureError(MergekittyError):
    """The tensors of a model cannot be understood, or the inputs do not fit together."""


class PlanError(MergekittyError):
    """The config and the models cannot be turned into a plan (missing tensor, shape mismatch...)."""


class OutputError(MergekittyError):
    """The output directory cannot be written as asked (it is an input, it is a file...)."""


class MergeError(MergekittyError):
    """Computing or writing one output tensor failed; the message names the tensor."""
