"""The output transaction: the one way a model or an adapter is written.

Every command that writes an output (merge, MoE, LoRA merge, extracted adapter) does it
through an ``OutputTransaction``::

    with OutputTransaction(out_path) as out:          # begin: lock, staging directory
        writer = out.open_shards(layout, shard_size)  # the native ShardWriter, in staging
        out.copy_file(donor / "generation_config.json")
        copy_tokenizer(donor, out.dir)                # helpers that write files take out.dir
        ...stream tensors into writer...
        out.commit(json.dumps(config))                # the new model replaces the old in one step

What it guarantees:
- **Nothing visible until it is whole.** The new output is assembled in a staging directory
  beside the output (``.NAME.mergekitty-staging``, on the same file system so the final step
  is a rename). The output directory is not touched until the new model is complete and
  fsynced; then the two directories are exchanged in one atomic step (``renameat2`` with
  ``RENAME_EXCHANGE``). ``kill -9`` at any moment leaves either the old output or the new one.
  Where the file system cannot exchange, the old directory is renamed aside and the new one
  into place; a run killed between those two renames is repaired by the next run on that
  output, which puts the old directory back.
- **One run per output.** A lock file beside the output (``.NAME.mergekitty-lock``, held with
  lock: io/platform.py) makes a second run on the same output fail at once with a message naming the
  process that holds it. The kernel drops the lock when its holder dies, so a killed run
  never blocks the next one.
- **Files the tool did not write are kept.** Entries of the old output that do not match
  ``owned`` (the file patterns this kind of output consists of) and that the new output does
  not write are carried into the new directory (files as hard links before the exchange,
  directories moved), so notes, a ``.git`` folder or a hand-written README survive a re-merge.
- **What a killed run leaves is cleaned by the next one**: it removes the old output's files
  that were replaced and moves any carried entry back where it belongs.
- **Resume.** Given a ``resume_key`` (a digest of the plan and its inputs), the shard writer
  renames each shard into the staging directory as soon as it is complete and journals its size
  and digest. A killed or interrupted run leaves those shards there; the next run with the same
  key verifies them (size and digest, read back) and writes only the rest. Any other leftover
  staging directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import OutputError
from ..tokenizer.write import TOKENIZER_FILES
from . import platform

log = logging.getLogger(__name__)

MODEL_MARKER = "config.json"

# Files copied from the donor model next to the weights (the tokenizer's are TOKENIZER_FILES).
SIDECAR_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "mergekitty_layout.json",
)
# What a model output consists of: an old output's files matching these are replaced by the new
# output as a whole (an old shard or tokenizer file never survives next to new weights).
MODEL_FILES = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    ".*.partial",
    MODEL_MARKER,
    "mergekitty_health.json",
    *TOKENIZER_FILES,
    *SIDECAR_FILES,
)

# Files the tool writes that an old output may hold as the user's own: carried into the new output
# when it writes none, replaced when it writes its own.
REPLACEABLE_FILES = ("README.md", "mergekitty_config.yml")
# The staging directory's record of the shards completed so far (for a rerun to reuse).
JOURNAL_FILE = ".mergekitty-journal"
# In a staging directory until the moment it becomes the output: what a killed run left with it is
# unfinished and is removed whole (only carried directories go back).
INCOMPLETE = ".mergekitty-incomplete"

STAGING_SUFFIX = ".mergekitty-staging"
OLD_SUFFIX = ".mergekitty-old"
LOCK_SUFFIX = ".mergekitty-lock"


def check_output_path(out_path: str | os.PathLike, inputs: Iterable[tuple[Path, str]]) -> None:
    """OutputError unless ``out_path`` can be an output directory: not a file, not a dangling
    or looping symlink, and neither one of the ``inputs`` ((directory or file, what it is, e.g.
    "input model org/model")), nor inside one, nor holding one."""
    resolved = resolve_output(out_path)
    for src, what in inputs:
        src = Path(src).resolve()
        if resolved == src:
            raise OutputError(f"output directory {out_path} is the {what}; choose another directory")
        if src in resolved.parents:
            raise OutputError(f"output directory {out_path} is inside the {what}; choose another directory")
        if resolved in src.parents:
            # the new output replaces the directory as a whole: what it holds would be replaced under the reader
            raise OutputError(f"output directory {out_path} holds the {what}; choose another directory")


def resolve_output(out_path: str | os.PathLike) -> Path:
    """The real directory an output path names (symlinks followed), or OutputError saying why
    it cannot be one. The directory itself need not exist yet."""
    out = Path(out_path).expanduser()
    try:
        resolved = Path(os.path.realpath(out, strict=False))
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"output path {out_path} cannot be resolved: {exc}") from None
    if out.is_symlink():
        try:
            os.stat(out)
        except OSError as exc:
            what = (
                "a symlink loop"
                if exc.errno == errno.ELOOP
                else f"a symlink to {os.readlink(out)}, which does not exist"
            )
            raise OutputError(f"output path {out_path} is {what}") from None
    for p in (resolved, *resolved.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "exists" if p == resolved else f"is inside {p}, which"
                raise OutputError(f"output path {out_path} {where} is not a directory")
            break
    return resolved


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _OutputLock:
    """An exclusive ``flock`` on a file beside the output. A second holder is refused at once;
    the kernel releases the lock when the process dies, so a stale lock file is simply taken."""

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self.output = output
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                platform.lock_now(fd)
            except BlockingIOError:
                holder = platform.read_at(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise OutputError(
                    f"output directory {self.output} is being written by another run ({holder}); "
                    "wait for it to finish or choose another directory"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the file was released and removed under us: take the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        platform.write_at(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still held: a waiting run then retries on a fresh file
        os.close(self.fd)
        self.fd = None


class OutputTransaction:
    """One output directory being written; see the module docstring.

    ``marker`` is the file ``commit`` writes last (``config.json`` for a model,
    ``adapter_config.json`` for an adapter); ``owned`` are the glob patterns of the files this
    kind of output consists of. Leaving the ``with`` block by an exception, or without
    ``commit``, aborts: the staging directory goes and the output stays as it was.
    """

    def __init__(
        self,
        out_path: str | os.PathLike,
        *,
        marker: str = MODEL_MARKER,
        owned: Iterable[str] = MODEL_FILES,
        resume_key: str | None = None,
    ) -> None:
        self.path = Path(out_path).expanduser()
        self.resume_key = resume_key
        self._reused: list[dict[str, Any]] = []  # the verified journal entries of an earlier run
        self.marker = marker
        self._owned = (*owned, marker)
        self._writer: Any = None
        self._state = "new"  # new -> open -> committed | aborted
        self._target = self.path  # the real directory (symlinks resolved) set by begin
        self._lock: _OutputLock | None = None
        self._written: set[str] = set()  # names written through open_file

    @property
    def reused(self) -> list[str]:
        """The complete shards of an earlier run of the same plan that this run takes as written."""
        return [entry["shard"] for entry in self._reused]

    def _resumable(self) -> set[str]:
        """What of the staging directory a rerun needs: the reused shards and the journal."""
        return {*self.reused, JOURNAL_FILE} if self._reused else set()

    def _beside(self, suffix: str) -> Path:
        return self._target.parent / f".{self._target.name}{suffix}"

    @property
    def dir(self) -> Path:
        """The staging directory the new output is written into."""
        return self._beside(STAGING_SUFFIX)

    # ------------------------------------------------------------------ lifecycle
    def begin(self) -> OutputTransaction:
        """Take the lock, repair what a killed run left, and create an empty staging directory."""
        if self._state != "new":
            raise OutputError(f"the output transaction for {self.path} has already begun")
        self._target = resolve_output(self.path)
        try:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _OutputLock(self._beside(LOCK_SUFFIX), self.path)
            self._lock.acquire()
        except OSError as exc:
            raise OutputError(f"cannot write to {self.path}: {_reason(exc)}") from None
        try:
            self._recover()
            self.dir.mkdir(exist_ok=True)
            (self.dir / INCOMPLETE).touch()
            if self.resume_key is not None:
                self._start_journal()
        except BaseException as exc:
            with contextlib.suppress(OSError):
                if self.dir.exists():
                    self._dispose(self.dir, keep=self._resumable())
            self._lock.release()
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write to {self.path}: {_reason(exc)}") from None
            raise
        self._state = "open"
        return self

    def _recover(self) -> None:
        """Put right what an earlier, killed run on this output left beside it."""
        old = self._beside(OLD_SUFFIX)
        if old.exists() and not self._target.exists():
            os.rename(old, self._target)  # killed between the two renames of a swap: restore
        if old.exists():
            self._dispose(old)
        if self.dir.exists():
            self._reused = self._verified_shards()
            self._dispose(self.dir, keep=self._resumable())

    def _verified_shards(self) -> list[dict[str, Any]]:
        """The journal entries of the shards an earlier run of the same plan completed in
        staging whose size and digest the files still have."""
        from .. import _native

        if self.resume_key is None:
            return []
        entries = _journal_entries(self.dir / JOURNAL_FILE)
        if not entries or entries[0] != {"key": self.resume_key}:
            return []
        verified = []
        for entry in entries[1:]:
            name = entry.get("shard")
            if not isinstance(name, str) or "/" in name or not _matches(name, self._owned):
                continue
            path = self.dir / name
            try:
                if path.stat().st_size == entry.get("size") and _native.shard_digest(path) == entry.get("digest"):
                    verified.append(entry)
            except (OSError, ValueError):
                continue  # missing, damaged or unreadable: written again
        return verified

    def _start_journal(self) -> None:
        """The journal of this run: its key, then the shards reused (the writer appends the
        shards it completes)."""
        lines = [{"key": self.resume_key}, *self._reused]
        tmp = self.dir / f"{JOURNAL_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / JOURNAL_FILE)

    def __enter__(self) -> OutputTransaction:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "committed":
            # an interrupted run keeps its complete shards for the rerun; a failed one does not
            self.abort(keep_complete_shards=isinstance(exc, KeyboardInterrupt))
        if isinstance(exc, OSError) and str(exc.filename or "").startswith(str(self.dir)):
            # a write into staging failed (disk full, I/O error): say which output, not which temp file
            raise OutputError(f"cannot write to {self.path}: {_reason(exc, with_file=False)}") from None

    def commit(self, marker_text: str) -> list[str]:
        """Finish the shards, write the marker, make it all durable, and replace the output with
        it in one step. Returns the names the new output consists of, the marker last."""
        self._check_open()
        try:
            published: list[str] = []
            if self._writer is not None:
                published += self._writer.finalize()
            self._write_marker(marker_text)
            (self.dir / JOURNAL_FILE).unlink(missing_ok=True)
            names = sorted(p.name for p in self.dir.iterdir() if p.name != INCOMPLETE)
            deferred = self._carry_foreign_entries()
            (self.dir / INCOMPLETE).unlink()  # from here a killed run leaves a whole new output
            platform.fsync_dir(self.dir)
            self._replace_output()
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write to {self.path}: {_reason(exc)}") from None
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        try:
            for name in deferred:  # from the old output (now at the staging path) into the new
                if not os.path.lexists(self._target / name):
                    os.rename(self.dir / name, self._target / name)
            self._dispose(self.dir)  # the rest of the old output
            platform.fsync_dir(self._target.parent)
        except OSError as exc:
            log.warning("the new output is in place; cleaning up the old one failed: %s", _reason(exc))
        finally:
            self._release()
        order = [n for n in published if n in names] + [n for n in names if n not in published and n != self.marker]
        return [*order, self.marker]

    def abort(self, keep_complete_shards: bool = False) -> None:
        """Remove the staging directory (or, with ``keep_complete_shards`` and a resume key, all
        of it but the journaled shards and the journal); the output stays as it was. Idempotent."""
        if self._state in ("committed", "aborted", "new"):
            self._state = "aborted" if self._state == "new" else self._state
            return
        self._state = "aborted"
        try:
            if self._writer is not None:
                self._writer.abort()
            if self.dir.exists():
                keep = self._journaled() if keep_complete_shards and self.resume_key is not None else set()
                self._dispose(self.dir, keep=keep | {JOURNAL_FILE} if keep else set())
        except OSError as exc:
            log.warning("could not remove the staging directory %s: %s", self.dir, _reason(exc))
        finally:
            self._release()

    def _journaled(self) -> set[str]:
        """The shard names this run's journal records (complete, in staging)."""
        names = {e.get("shard") for e in _journal_entries(self.dir / JOURNAL_FILE)[1:]}
        return {n for n in names if isinstance(n, str) and "/" not in n and (self.dir / n).is_file()}

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_open(self) -> None:
        if self._state != "open":
            raise OutputError(f"the output transaction for {self.path} is {self._state}, not open")

    # ------------------------------------------------------------------ the final step
    def _carry_foreign_entries(self) -> list[str]:
        """Give the new output what the old one holds that the tool did not write, as hard
        links (a directory as a tree of them): both outputs have it until the exchange, so
        there is no moment when the visible output lacks it. What cannot be linked cheaply (a
        large tree, another device, a file system without hard links) is returned, to be moved
        across after the exchange instead (a run killed in between leaves it in the old output
        beside, and the next run moves it)."""
        deferred: list[str] = []
        if not self._target.is_dir():
            return deferred
        for entry in self._target.iterdir():
            if _matches(entry.name, self._owned) or os.path.lexists(self.dir / entry.name):
                continue
            if not _linkable(entry, self.dir):
                deferred.append(entry.name)
                continue
            try:
                _link_tree(entry, self.dir / entry.name)
            except OSError:
                _remove(self.dir / entry.name)
                deferred.append(entry.name)
        return deferred

    def _replace_output(self) -> None:
        target = self._target
        if not target.exists():
            os.rename(self.dir, target)
            self.dir.mkdir()  # the (empty) old output, disposed of like any other
            return
        if platform.exchange(self.dir, target):
            return
        old = self._beside(OLD_SUFFIX)
        os.rename(target, old)
        os.rename(self.dir, target)
        os.rename(old, self.dir)

    def _dispose(self, leftover: Path, keep: set[str] | None = None) -> None:
        """Remove a directory left beside the output: an unfinished staging directory (it holds
        the ``INCOMPLETE`` stamp) or a replaced output. What the output also has (hard links
        carried there) goes, and so does what the tool writes; anything else is moved into the
        output, or kept (with a warning) where the output has an entry of that name. The
        directory itself goes once it is empty. The user's files are never deleted."""
        unfinished = (leftover / INCOMPLETE).exists()
        kept = []
        for entry in leftover.iterdir():
            name = entry.name
            if keep and name in keep:
                continue
            dest = self._target / name
            is_dir = entry.is_dir() and not entry.is_symlink()
            if os.path.lexists(dest) and _mirrored(entry, dest):
                _remove(entry)
            elif not is_dir and (unfinished or self._disposable(name)):
                entry.unlink()
            elif not os.path.lexists(dest) and self._target.is_dir():
                os.rename(entry, dest)
            else:
                kept.append(name)
        if kept:
            log.warning("kept %s in %s: the output has entries of the same names", ", ".join(sorted(kept)), leftover)
        elif not keep:
            leftover.rmdir()

    def _disposable(self, name: str) -> bool:
        return (
            _matches(name, self._owned)
            or name in self._written
            or name in (*REPLACEABLE_FILES, INCOMPLETE, JOURNAL_FILE)
        )

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
                str(self.dir),
                layout,
                shard_size_bytes,
                None,
                {"mergekitty_version": __version__},
                reuse=self.reused,
                journal=self.dir / JOURNAL_FILE if self.resume_key is not None else None,
            )
        except OSError as exc:
            raise OutputError(f"cannot write to {self.path}: {_reason(exc)}") from None
        reused_bytes = sum((self.dir / n).stat().st_size for n in self.reused)
        self._check_space(self._writer.total_bytes - reused_bytes)
        return self._writer

    def _check_space(self, needed_bytes: int) -> None:
        """OutputError before any weight is read when the output's file system cannot hold the
        new model (the old one is replaced only at the end, so it still takes its space)."""
        try:
            free = platform.free_bytes(self.dir)
        except OSError:
            return  # no figure to check against: the writes themselves will tell
        if free < needed_bytes + SPACE_MARGIN_BYTES:
            raise OutputError(
                f"not enough free space for {self.path}: the new model needs {_size(needed_bytes)}, "
                f"{self.dir.parent} has {_size(free)} free"
            )

    @contextmanager
    def open_file(self, name: str, mode: str = "wb") -> Iterator[IO[Any]]:
        """A file of the new output, written durably into the staging directory."""
        self._check_open()
        path = self.dir / name
        self._written.add(name)
        try:
            with open(path, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write {name} to {self.path}: {_reason(exc)}") from None

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

    def _write_marker(self, text: str) -> None:
        self.write_text(self.marker, text)


# A directory of more entries than this is moved across after the exchange rather than linked.
LINK_TREE_MAX_ENTRIES = 10_000


def _linkable(entry: Path, into: Path) -> bool:
    """Whether ``entry`` (a file, a symlink or a directory tree) is on ``into``'s device and small
    enough to carry as hard links."""
    device = os.stat(into).st_dev
    if os.lstat(entry).st_dev != device:
        return False
    if not entry.is_dir() or entry.is_symlink():
        return True
    count = 0
    for root, dirs, files in os.walk(entry):
        count += len(dirs) + len(files)
        if count > LINK_TREE_MAX_ENTRIES or os.lstat(root).st_dev != device:
            return False
    return True


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as hard links of ``src`` (a file, a symlink, or a directory tree)."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        for entry in src.iterdir():
            _link_tree(entry, dst / entry.name)
        return
    os.link(src, dst, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _mirrored(a: Path, b: Path) -> bool:
    """Whether ``a`` is the same file as ``b``, or a directory tree of hard links of ``b``'s."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    if os.path.samestat(sa, sb):
        return True
    if not (a.is_dir() and b.is_dir()) or a.is_symlink() or b.is_symlink():
        return False
    names = {e.name for e in a.iterdir()}
    return names <= {e.name for e in b.iterdir()} and all(_mirrored(a / n, b / n) for n in names)


def _journal_entries(path: Path) -> list[dict[str, Any]]:
    """The journal's lines (its key first, then one per complete shard); a line a kill tore, or
    anything else that is not a JSON object, is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    entries = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


# Room kept for the side files, the tokenizer and the file system's own metadata.
SPACE_MARGIN_BYTES = 1 << 20


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _reason(exc: OSError, with_file: bool = True) -> str:
    """An OSError as a short reason: the errno's text and the file it concerns."""
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        text = "no space left on device"
    return f"{text} ({exc.filename})" if exc.filename and with_file else text
