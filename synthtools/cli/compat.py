"""FreeSurfer flags that pipelines send and synthtools does not implement
(issue 35): each is refused at parse time on one line (exit 2, nothing
processed), or accepted with a note on stderr saying what it does here.

Pipeline wrappers (nipype, Pydra, the NiPreps) write FreeSurfer's command
lines; an "unrecognized arguments" error would say nothing useful, so every
flag of ``mri_synthstrip``, ``mri_synthseg`` and ``mri_synthmorph`` is known
to the parsers, and the ones without an equivalent say why.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from .common import UsageError


class _Refuse(argparse.Action):
    """An option that stops parsing with ``<flag>: <reason>``."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str = "", **kwargs: Any) -> None:
        self.reason = reason
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise UsageError(f"{option_string}: {self.reason} (FreeSurfer's flag, not implemented here; "
                         f"see {parser.prog} -h)")


def refuse(p: argparse.ArgumentParser, *flags: str, reason: str, takes_value: bool = False) -> None:
    """Declare FreeSurfer ``flags`` that this tool refuses, with the reason (one line)."""
    p.add_argument(*flags, action=_Refuse, reason=reason, nargs=1 if takes_value else 0,
                   default=argparse.SUPPRESS, metavar="X" if takes_value else None,
                   help=f"FreeSurfer's; refused here: {reason}".replace("%", "%%"))


def note(prog: str, message: str) -> None:
    """``<prog>: note: message`` on stderr (how a FreeSurfer flag is taken here)."""
    print(f"{prog}: note: {' '.join(message.split())}", file=sys.stderr)
