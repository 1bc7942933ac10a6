"""The output transaction: the one way a model or an adapter is written.

Every command that writes an output (merge, MoE, LoRA merge, extracted adapter) does it
through an ``OutputTransaction``::

    with OutputTransaction(out_path) as out:          # begin: the directory is prepared
        writer = out.open_shards(layout, shard_size)  # the native ShardWriter
        out.copy_file(donor / "generation_config.json")
        copy_tokenizer(donor, out.dir)                # helpers that write files take out.dir
        ...stream tensors into writer...
        out.commit(json.dumps(config))                # everything published, the marker last

The marker (``config.json`` for a model, ``adapter_config.json`` for an adapter) is written
last: until it exists the directory does not load, so an output that looks complete is
complete. Files written through the transaction (the shards, ``write_text``, ``copy_file``,
``open_file``) wait under hidden temp names until ``commit`` renames them into place. An
exception inside the block aborts: the temp files are removed, and so is anything a
failed ``commit`` had already published. Files the tool did not write are never touched.

Today the temp files sit in the output directory itself, ``begin`` removes the files an
earlier run of the same kind left there (so an old tokenizer or shard cannot survive next
to new weights), and helpers that write into ``dir`` (the tokenizer writers) publish at
once. The interface is meant to stay as it is when the transaction grows a staging
directory beside the output (``dir`` becomes it), a lock against a concurrent run on the
same output, and a journal of finished shards for resuming: callers name files relative to
the output, write other files only into ``dir``, and never touch ``path`` themselves.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import OutputError
from ..tokenizer.write import TOKENIZER_FILES

MODEL_MARKER = "config.json"

# Files copied from the donor model next to the weights (the tokenizer's are TOKENIZER_FILES).
SIDECAR_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "mergekitty_layout.json",
)
# What an earlier model output may have left that must not survive next to new weights.
MODEL_FILES = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    ".*.partial",
    MODEL_MARKER,
    *TOKENIZER_FILES,
    *SIDECAR_FILES,
)


def check_output_path(out_path: str | os.PathLike, inputs: Iterable[tuple[Path, str]]) -> None:
    """OutputError unless ``out_path`` can be an output directory: not a file, and neither one of
    the ``inputs`` ((directory, what it is, e.g. "input model org/model")) nor inside one."""
    out = Path(out_path).expanduser()
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out_path} exists and is not a directory")
    for src, what in inputs:
        src = Path(src).resolve()
        if resolved == src:
            raise OutputError(f"output directory {out_path} is the {what}; choose another directory")
        if src in resolved.parents:
            raise OutputError(f"output directory {out_path} is inside the {what}; choose another directory")


def _temp_name(name: str) -> str:
    return f".{name}.partial"


@contextmanager
def _durable(tmp: Path, mode: str) -> Iterator[IO[Any]]:
    """``tmp`` open for writing, on disk when the block ends; removed if the block raises."""
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputTransaction:
    """One output directory being written; see the module docstring.

    ``marker`` is the file ``commit`` writes last; ``stale`` are glob patterns (relative to
    the output) of files an earlier run of this kind wrote, removed by ``begin``.
    Leaving the ``with`` block by an exception, or without ``commit``, aborts.
    """

    def __init__(
        self, out_path: str | os.PathLike, *, marker: str = MODEL_MARKER, stale: Iterable[str] = MODEL_FILES
    ) -> None:
        self.path = Path(out_path).expanduser()
        self.marker = marker
        self._stale = tuple(stale)
        self._writer: Any = None
        self._pending: dict[str, Path] = {}  # name -> its temp file, renamed by commit
        self._published: list[str] = []  # what commit has put in place so far
        self._state = "new"  # new -> open -> committed | aborted

    @property
    def dir(self) -> Path:
        """The directory files are written into now (the output itself, for now)."""
        return self.path

    # ------------------------------------------------------------------ lifecycle
    def begin(self) -> OutputTransaction:
        """Create the output directory and remove what an earlier run left in it."""
        if self._state != "new":
            raise OutputError(f"the output transaction for {self.path} has already begun")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for pattern in self._stale:
                for stale in self.path.glob(pattern):
                    if stale.is_file():
                        stale.unlink()
        except OSError as exc:
            raise OutputError(f"cannot write to {self.path}: {exc}") from None
        self._state = "open"
        return self

    def __enter__(self) -> OutputTransaction:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "committed":
            self.abort()

    def commit(self, marker_text: str) -> list[str]:
        """Publish the shards and the other files, then write the marker last. Returns the
        names published, the marker last."""
        self._check_open()
        try:
            if self._writer is not None:
                self._published += self._writer.finalize()
            for name, tmp in self._pending.items():
                os.replace(tmp, self.dir / name)
                self._published.append(name)
            self._pending.clear()
            self._write_now(self.marker, marker_text)
            _fsync_dir(self.dir)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write to {self.path}: {exc}") from None
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return [*self._published, self.marker]

    def abort(self) -> None:
        """Remove the temp files, and what a failed commit published. Idempotent."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        if self._writer is not None:
            self._writer.abort()
        for tmp in self._pending.values():
            tmp.unlink(missing_ok=True)
        for name in self._published:
            (self.dir / name).unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise OutputError(f"the output transaction for {self.path} is {self._state}, not open")

    # ------------------------------------------------------------------ writing
    def open_shards(self, layout: list[tuple[str, str, list[int]]], shard_size_bytes: int):
        """The native ShardWriter for ``layout`` ((name, dtype code, shape) in file order);
        ``shard_size_bytes`` <= 0 means one shard. ``commit`` finalizes it."""
        from .. import __version__, _native

        self._check_open()
        if self._writer is not None:
            raise OutputError(f"the shards of {self.path} are already open")
        try:
            self._writer = _native.ShardWriter(
                str(self.dir), layout, shard_size_bytes, None, {"mergekitty_version": __version__}
            )
        except OSError as exc:
            raise OutputError(f"cannot write to {self.path}: {exc}") from None
        return self._writer

    @contextmanager
    def open_file(self, name: str, mode: str = "wb") -> Iterator[IO[Any]]:
        """A file to write as ``name``; ``commit`` puts it in place (its temp file is removed
        if the block raises)."""
        self._check_open()
        tmp = self.dir / _temp_name(name)
        self._pending.pop(name, None)
        with _durable(tmp, mode) as f:
            yield f
        self._pending[name] = tmp

    def write_text(self, name: str, text: str) -> None:
        with self.open_file(name, "w") as f:
            f.write(text)

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        """Copy ``src`` into the output (under its own name unless ``name`` is given)."""
        src = Path(src)
        with open(src, "rb") as fin, self.open_file(name or src.name) as fout:
            shutil.copyfileobj(fin, fout)

    def copy_files(self, src_dir: str | os.PathLike, names: Iterable[str]) -> None:
        """Copy each of ``names`` that ``src_dir`` has."""
        from .checkpoint import confined

        for name in names:
            if (Path(src_dir) / name).is_file():
                self.copy_file(confined(Path(src_dir), name, str(src_dir)), name)

    def _write_now(self, name: str, text: str) -> None:
        tmp = self.dir / _temp_name(name)
        with _durable(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.dir / name)
