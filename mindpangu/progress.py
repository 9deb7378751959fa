"""Progress bars that suit both a terminal and a log file (tqdm's conventions for non-interactive output)."""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # redrawing a bar into a file every 0.1 s (tqdm's default) floods logs with carriage returns


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr. On a terminal it is tqdm's live bar; when stderr is a file or a pipe it redraws at most
    every ``LOG_INTERVAL_S`` seconds, in ASCII and a fixed width, so a long run's log gets a few status lines. Keyword
    arguments go to tqdm (``total``, ``desc``, ``unit``, ``disable``, ...); explicit ones win."""
    stream = kwargs.get("file") or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    defaults = {"dynamic_ncols": True} if interactive else {"mininterval": LOG_INTERVAL_S, "ascii": True, "ncols": 100}
    return tqdm(**{**defaults, **kwargs})
