"""Imported first by :mod:`orchestra.cli`: Ctrl-C while the command's modules load.

Loading them (httpx, idna, click, the settings) takes about 0.3 s; an interrupt then was a
KeyboardInterrupt traceback from whichever module was loading, before the command's group
(``_Commands``) could say it as one line. While this module's handler is in place, Ctrl-C
says ``interrupted`` and exits 130, as an interrupt later does. :func:`done` hands SIGINT
back (at the end of :mod:`orchestra.cli`'s loading), so a program that imports the CLI
keeps its own Ctrl-C.
"""

from __future__ import annotations

import os
import signal  # (and as few other modules as can be: the handler is set when they are)
import sys
from types import FrameType


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    """Say it and leave at once: nothing was asked of a server yet, nothing to undo."""
    try:
        sys.stderr.write("\ninterrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signal.SIGINT)


try:
    _before = signal.signal(signal.SIGINT, _interrupted)
except ValueError:  # not the main thread, which alone sets handlers: the importer's stays
    _before = None


def done() -> None:
    """Hand SIGINT back to the handler it had before (Python's: KeyboardInterrupt)."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler if _before is None else _before)
