"""The one base of every error a user's input causes (a config value, a data file, a model path,
a run directory): the command prints its message as one line, never a traceback (the traceback
goes to the run's ``status.json``, or to the terminal with ``HYDRA_FULL_ERROR=1``).

It is a Hydra ``CompactHydraException``, so Hydra itself prints only the message where a sweep's
cell fails; and a ``ValueError``, as the checks' callers have always caught."""

from __future__ import annotations

import contextlib
import os
import sys

from hydra.errors import CompactHydraException


class UserError(CompactHydraException, ValueError):
    """Input that cannot run, named with its value and what is allowed."""


@contextlib.contextmanager
def one_line_errors(multirun: bool):
    """tip's own errors (``UserError``: a value, a file, a run directory) end the command with one
    line, not a traceback; ``HYDRA_FULL_ERROR=1`` shows it whole. In a sweep the error goes to
    Hydra, which prints it as one line after the cell's overrides and goes on with the others."""
    try:
        yield
    except UserError as exc:
        if multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
