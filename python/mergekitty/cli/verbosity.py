"""How much a command says, and the one place that turns ``-q``/``-v``/``-vv`` into logging levels.

Everything below goes to stderr; stdout carries only what a command is asked to print.

* ``-q``: errors only (a refused merge, a bad config). Notes, warnings, progress, the result
  line and the health summary are left out.
* default: notes, warnings, a progress bar when stderr is a terminal, the health summary and
  the result line.
* ``-v``: also the plan summary before the merge, the time and bytes of each phase after it,
  and the library's INFO messages.
* ``-vv``: also a line per tensor (its kernel and time), and DEBUG messages.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import rich_click as click

QUIET, NORMAL, VERBOSE, PER_TENSOR = -1, 0, 1, 2

# the package's logger: its level follows -v; other libraries' stay at WARNING (ERROR with -q)
PACKAGE_LOGGER = "mergekitty"
_TRANSFORMERS_VERBOSITY = "TRANSFORMERS_VERBOSITY"


@dataclass(frozen=True)
class Verbosity:
    level: int = NORMAL

    @property
    def quiet(self) -> bool:
        return self.level <= QUIET

    @property
    def verbose(self) -> bool:
        return self.level >= VERBOSE

    @property
    def per_tensor(self) -> bool:
        return self.level >= PER_TENSOR

    @property
    def package_level(self) -> int:
        """The level of the package's own log messages."""
        return {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}.get(self.level, logging.DEBUG)

    @property
    def other_level(self) -> int:
        """The level of other libraries' log messages (transformers, huggingface_hub...)."""
        return logging.ERROR if self.quiet else logging.WARNING

    @staticmethod
    def from_flags(quiet: bool, verbose: int) -> Verbosity:
        if quiet and verbose:
            raise click.UsageError("--quiet and --verbose contradict each other; give one")
        return Verbosity(QUIET if quiet else min(verbose, PER_TENSOR))


def verbosity_options(fn, verbose_help: str | None = None):
    """``-q/--quiet`` and ``-v/--verbose`` (a count); they arrive as ``quiet`` and ``verbose``.
    ``--no-quiet`` stays accepted: older command lines pass it."""
    opts = [
        click.option(
            "-q",
            "--quiet/--no-quiet",
            "quiet",
            default=False,
            help="Print errors only: no progress, notes or warnings.",
        ),
        click.option(
            "-v",
            "--verbose",
            "verbose",
            count=True,
            metavar="",
            help=verbose_help or "-v: also INFO messages; -vv: also DEBUG messages.",
        ),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


class _ConsoleHandler(logging.Handler):
    """Log records as ``warning: ...`` lines through a rich console on stderr (looked up when a
    record is written, so a redirected stderr is honoured)."""

    def __init__(self, console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        from .shell import shown

        try:
            message = shown(record.getMessage())
            if record.levelno >= logging.ERROR:
                line = f"[bold red]error:[/] {message}"
            elif record.levelno >= logging.WARNING:
                line = f"[yellow]warning:[/] {message}"
            elif record.levelno >= logging.INFO:
                line = message
            else:
                line = f"[dim]debug: {shown(record.name)}:[/] {message}"
            self.console.print(line, highlight=False, soft_wrap=True)
        except Exception:  # a broken stderr must not turn a warning into a crash
            self.handleError(record)


@contextmanager
def logging_for(verbosity: Verbosity, console) -> Iterator[None]:
    """Route log records to ``console`` at the levels ``verbosity`` asks for while the block runs,
    then put the logging setup back as it was (a command run in-process leaves nothing behind)."""
    root = logging.getLogger()
    package = logging.getLogger(PACKAGE_LOGGER)
    # transformers logs through its own handler, at a level it sets from TRANSFORMERS_VERBOSITY
    # when it is first imported (which may be during the command)
    library = logging.getLogger("transformers")
    saved = (root.level, package.level, library.level, os.environ.get(_TRANSFORMERS_VERBOSITY))
    handler = _ConsoleHandler(console)
    root.addHandler(handler)
    root.setLevel(verbosity.other_level)
    package.setLevel(verbosity.package_level)
    if verbosity.quiet:
        library.setLevel(logging.ERROR)
        os.environ[_TRANSFORMERS_VERBOSITY] = "error"
    try:
        with warnings.catch_warnings():
            if verbosity.quiet:  # Python warnings of other libraries are warnings too
                warnings.simplefilter("ignore")
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        package.setLevel(saved[1])
        library.setLevel(saved[2])
        if saved[3] is None:
            os.environ.pop(_TRANSFORMERS_VERBOSITY, None)
        else:
            os.environ[_TRANSFORMERS_VERBOSITY] = saved[3]
