"""What every command runs inside: logging set up from ``-q``/``-v`` (verbosity.py), and errors
reported without tracebacks. A MergekittyError is one red line and exit status 1 (2 when what was
asked for needs an optional dependency that is not installed); Ctrl-C says what was not written
and exits with 130."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

from ..errors import MergekittyError, MissingExtraError
from .verbosity import Verbosity, logging_for


def stdout_console() -> Console:
    """The console for what a command is asked to print (a plan, a list): stdout, and when that
    is a file or a pipe, lines as long as they are (rich would wrap them at 80 columns)."""
    import sys

    if sys.stdout.isatty():
        return Console()
    return Console(width=100_000, soft_wrap=True)


def shown(exc: object) -> str:
    """The message as the terminal should show it: what looks like rich markup (a path such as
    ``m[/x]``) printed as it is, control characters (an escape sequence from a hostile file or
    config) written as ``\\x1b``."""
    text = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in str(exc))
    return escape(text)


@contextmanager
def command_shell(interrupted: str, verbosity: Verbosity) -> Iterator[Console]:
    """Run the block with a stderr console for its messages (silent under ``-q``) and log records
    routed to stderr at ``verbosity``'s levels; ``interrupted`` says what Ctrl-C left unwritten.
    Errors are printed whatever the verbosity."""
    console = Console(stderr=True, quiet=verbosity.quiet)
    errors = Console(stderr=True)
    try:
        with logging_for(verbosity, errors):
            yield console
    except MergekittyError as exc:
        # soft_wrap: one line however narrow the terminal (or none), so it can be grepped
        errors.print(f"[bold red]error:[/] {shown(exc)}", highlight=False, soft_wrap=True)
        # 2: the install lacks an extra (the inputs are fine), as for a command line asking too much
        sys.exit(2 if isinstance(exc, MissingExtraError) else 1)
    except OSError as exc:  # the environment (disk, permissions) rather than the inputs
        where = f" ({exc.filename})" if exc.filename else ""
        errors.print(f"[bold red]error:[/] {shown(f'{exc.strerror or exc}{where}')}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        errors.print(f"[bold red]interrupted:[/] {interrupted}", soft_wrap=True)
        sys.exit(130)
