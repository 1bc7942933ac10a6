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


class MissingExtraError(MergekittyError):
    """What was asked for needs an optional dependency that is not installed (extras.py raises
    it); ``feature`` says what, and the message how to install it, on one line."""

    def __init__(self, feature: str, package: str, install: str):
        self.feature = feature
        super().__init__(f"{feature} needs {package}: {install}")


class NonFiniteError(MergeError):
    """A merged tensor holds NaN or Inf values (refused unless ``allow_nonfinite``): ``tensor``
    names it, ``models`` the labels of its inputs that held such values (empty: the arithmetic
    produced them)."""

    def __init__(self, tensor: str, models: tuple[str, ...], message: str):
        self.tensor = tensor
        self.models = models
        super().__init__(message)


# ---------------------------------------------------------------- raised by the native module
# ``mergekitty._native`` raises these (it imports this module when it raises). Each also
# derives from the builtin its callers used to catch, so ``except KeyError`` and
# ``except OSError`` (with errno, strerror, filename and the errno's own subclass) keep working.


class SafetensorsError(ModelFormatError):
    """A file is not a valid safetensors file; the message names the file and the tensor."""


class TensorNotFoundError(MergekittyError, KeyError):
    """A tensor is not in the file (or the output layout) it was looked up in; the message names both."""

    # KeyError's own __str__ would print the message in quotes
    __str__ = BaseException.__str__


class InvalidArgumentError(MergekittyError, ValueError):
    """A value passed to a mergekitty function is out of its domain (a dtype the kernels do not
    handle, a buffer of the wrong size, a density outside [0, 1]...)."""


class ShardWriterError(OutputError, ValueError):
    """The shard writer was used against its layout (an unknown, repeated or missing tensor, a
    size that differs from the plan, a closed writer); the message names the tensor."""


class FileIOError(MergekittyError, OSError):
    """The operating system refused a file operation. ``FileIOError(errno, strerror, filename)``
    gives an instance of the errno's subclass (``MissingFileError`` is also a
    ``FileNotFoundError``...), as ``OSError(errno, ...)`` does; on Windows a fourth argument,
    ``winerror``, decides it, as it does for ``OSError``."""

    def __new__(cls, *args: object) -> FileIOError:
        if cls is FileIOError and len(args) >= 2 and isinstance(args[0], int):
            cls = _FILE_IO_SUBCLASSES.get(type(OSError(*args)), cls)
        return super().__new__(cls, *args)


class MissingFileError(FileIOError, FileNotFoundError):
    pass


class FilePermissionError(FileIOError, PermissionError):
    pass


class FileIsADirectoryError(FileIOError, IsADirectoryError):
    pass


class FileNotADirectoryError(FileIOError, NotADirectoryError):
    pass


class FileAlreadyExistsError(FileIOError, FileExistsError):
    pass


_FILE_IO_SUBCLASSES: dict[type[OSError], type[FileIOError]] = {
    FileNotFoundError: MissingFileError,
    PermissionError: FilePermissionError,
    IsADirectoryError: FileIsADirectoryError,
    NotADirectoryError: FileNotADirectoryError,
    FileExistsError: FileAlreadyExistsError,
}
