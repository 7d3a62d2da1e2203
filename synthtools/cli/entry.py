"""How every console tool starts and ends: ``entry(prog, body, argv)``.

Used by synthstrip, synthseg, synthmorph, synthtools, synthtools-bids and
synthgen. ``body(argv)`` does the work and returns the exit code; the
failures it may raise become one line ``<prog>: error: ...`` on stderr and
an exit code, never a traceback:

* :class:`UsageError` (bad arguments): 2;
* the tool's own ``failures`` (exception class -> code); by default
  :class:`synthtools.io.InputError` (bad input file, runtime failure): 1;
* Ctrl-C: 130;
* a closed stdout (``tool | head``): quiet, 1.

Importing this module is cheap (no numpy, nibabel or torch): ``synthgen
--help`` must answer at once. Importing the package ``synthtools.cli``
first prepares the thread environment (see :mod:`synthtools.cli`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence, Tuple, Type, Union

Failures = Sequence[Tuple[Union[Type[BaseException], Tuple[Type[BaseException], ...]], int]]
Body = Callable[[Optional[Sequence[str]]], Optional[int]]


class UsageError(Exception):
    """Bad arguments: nothing is processed, exit code 2. (Bad input files
    and runtime failures are :class:`~synthtools.io.InputError`, exit code 1.)"""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised as UsageError).
    Its subcommands' parsers are of this class too."""

    # argparse prints the whole usage block before the error; we promise a
    # single line, so raise instead and let entry() print it.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} -h)")


def say_error(prog: str, message: str) -> None:
    """Print ``<prog>: error: message`` on one line to stderr."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _tool_failures() -> Failures:
    # Imported here, not at the top: synthtools.io loads numpy and nibabel,
    # and a tool that raised an InputError has loaded it already.
    from ..io import InputError
    return ((InputError, 1),)


def entry(prog: str, body: Body, argv: Sequence[str] | None = None, failures: Failures | None = None) -> int:
    """Run ``body(argv)`` and return its exit code (``None`` counts as 0).

    ``failures``: (exception class or classes, exit code) pairs, the first
    match wins; default: InputError -> 1. Anything else propagates (a bug
    keeps its traceback); so does SystemExit (argparse's ``-h``).
    """
    try:
        code = body(argv)
        sys.stdout.flush()   # here, so that a closed pipe is caught below, not at exit
    except UsageError as exc:
        say_error(prog, str(exc))
        return 2
    except KeyboardInterrupt:
        say_error(prog, "interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. '| head'): stop quietly, as other Unix
        # tools do; stdout goes to /dev/null so the exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        for kinds, exit_code in (_tool_failures() if failures is None else failures):
            if isinstance(exc, kinds):
                say_error(prog, str(exc))
                return exit_code
        raise
    return 0 if code is None else code
