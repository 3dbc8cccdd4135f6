"""Argument checks shared by the bench CLIs (``python -m omni_fast.bench``, ``.model``, ``.static_check``,
``.tune_moe``): a bad count, time limit or output path is an argparse error naming the flag before any work, not a
traceback (or a silently odd run) after it."""

from __future__ import annotations

import math
from pathlib import Path


def output_path_problem(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` (a results folder when ``folder``, else a file to write) cannot be created, or None."""
    if not folder and path.is_dir():
        return f"{path} is a folder (give a file path)"
    if folder and path.exists() and not path.is_dir():
        return f"{path} is a file (give a folder)"
    for parent in (path if folder else path.parent, *(path if folder else path.parent).parents):
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, so {path} cannot be made"
    return None


def positive_seconds(text: str) -> float:
    """argparse type of a time limit: a finite number > 0 (``nan`` never fired, ``-5`` ended a run at once)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count or size (tokens, experts, jobs, ...): an integer >= 1 (0 or less compiled, tuned
    or timed nothing, or failed deep inside a run)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
