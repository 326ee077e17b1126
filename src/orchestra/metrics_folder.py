"""The metrics directory a supervisor shares with its processes (``--processes N``).

prometheus-client's multiprocess mode keeps each process's recorded series in memory-mapped
files in one directory, named by ``PROMETHEUS_MULTIPROC_DIR`` (:data:`metrics.MULTIPROC_ENV`),
which a process reads when it first imports prometheus-client. The supervisor makes a fresh
directory before it starts any process, holds a lock on it while it runs (so that the next
supervisor removes those left by a killed one), and removes it when it stops.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prometheus_client import multiprocess as _multiprocess

from orchestra.metrics import MULTIPROC_ENV

#: The shared directories' names: the prefix, the supervisor's pid, a random part.
_SHARED_PREFIX = "orchestra-metrics-"
#: The file in a shared directory its supervisor holds locked (flock) for as long as it runs.
_HELD = ".supervisor.lock"


def _hold(folder: str) -> int:
    """Lock ``folder``'s :data:`_HELD` file for as long as this process runs (or until the
    descriptor returned is closed)."""
    fd = os.open(os.path.join(folder, _HELD), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _remove_orphans(parent: str) -> None:
    """Remove this user's shared directories in ``parent`` whose supervisor is gone (killed
    before its undo ran: SIGKILL, a power cut): those whose lock file nobody holds. A lock,
    not the pid: in another container sharing the folder the same pid is another process."""
    for found in Path(parent).glob(f"{_SHARED_PREFIX}*"):
        try:
            if not found.is_dir() or found.stat().st_uid != os.getuid():
                continue
            fd = os.open(found / _HELD, os.O_RDWR)
        except OSError:  # no lock file (not one of ours, or being made): left alone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its supervisor runs
            continue
        else:
            shutil.rmtree(found, ignore_errors=True)
        finally:
            os.close(fd)


def share_between_processes() -> Callable[[], None]:
    """Give the processes this one starts a fresh directory for their metrics (the variable
    :data:`MULTIPROC_ENV`, which they inherit), below the one it names already if set; returns
    the undo, which removes the directory and restores the variable.

    Called by the supervisor before it starts any process: prometheus-client picks its mode
    when first imported in a process, from this variable.
    """
    before = os.environ.get(MULTIPROC_ENV)
    parent = before or tempfile.gettempdir()
    _remove_orphans(parent)
    folder = tempfile.mkdtemp(prefix=f"{_SHARED_PREFIX}{os.getpid()}-", dir=parent)
    held = _hold(folder)
    os.environ[MULTIPROC_ENV] = folder

    def undo() -> None:
        if before is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = before
        shutil.rmtree(folder, ignore_errors=True)
        os.close(held)

    return undo


def process_exited(pid: int | None) -> None:
    """A service process exited: its gauges no longer count (its counters and histograms
    still do)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if pid is not None and folder:
        _multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
