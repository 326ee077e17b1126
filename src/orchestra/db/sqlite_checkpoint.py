"""Checkpoints of a SQLite file's write-ahead log, kept out of the writes' way.

No commit checkpoints (the writer sets ``wal_autocheckpoint`` 0: on the event loop a
checkpoint would hold it). A checkpoint is mostly copying pages and syncing the disk (7.8 ms a
hundred commits' pages here, 0.3 ms without the sync), and a PASSIVE one takes no lock a writer
needs. So every :data:`CHECKPOINT_COMMITS` commits, :class:`Checkpoints` first copies the log
into the database file on a thread and connection of its own, beside the writes; then the
writer's thread copies only what was committed meanwhile, before its next group, so that the
log starts over. Only that short part holds the writes (all of it did, when it ran on the
writer's thread alone).

A reader that keeps an old snapshot (a ``sqlite3`` shell left inside a transaction) stops
every checkpoint short of the log's end, and the log grows with every write until it ends.
The writer's part says so in the log (``database.log_growing``, at 64 MiB, then at each
doubling), and once the reader is gone the log starts over and is cut back to
:data:`WAL_KEPT_BYTES` (the writer's ``journal_size_limit``): it did not shrink.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestra import logs

#: Commits between two checkpoints of the write-ahead log (about a thousand pages, SQLite's
#: own default interval, at a dozen pages a task's write).
CHECKPOINT_COMMITS = 100
#: The size the log is cut back to when it starts over (the writer's ``journal_size_limit``).
WAL_KEPT_BYTES = 32 * 1024 * 1024
#: The log's size past which a checkpoint a reader holds back is reported (then at each
#: doubling).
WAL_WARN_BYTES = 64 * 1024 * 1024

log = logs.get("orchestra.db")


class Checkpoints:
    """When and how the log of the file at ``path`` is copied back into it.

    ``lock`` is the writer's own lock: :attr:`due` is read and cleared under it together with
    the writer's queue. ``writer_due`` is called (under no lock) once the copy aside is done
    and the writer's part is due; it starts the writer's thread if it is idle.
    """

    def __init__(
        self,
        path: Path,
        lock: threading.Lock,
        writer_due: Callable[[], None],
        warn_bytes: int = WAL_WARN_BYTES,
    ) -> None:
        self.path = path
        self.warn_bytes = warn_bytes
        #: The log's size when its growth was last reported (0: not growing).
        self._reported = 0
        self._lock = lock
        self._writer_due = writer_due
        #: Commits since the last checkpoint.
        self.commits = 0
        #: The log is being copied aside.
        self.copying = False
        #: The writer's part of a checkpoint is due (:meth:`finish`, before its next group).
        self.due = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestra-checkpoint")
        self._aside: sqlite3.Connection | None = None

    @property
    def idle(self) -> bool:
        """Neither part of a checkpoint is under way or due."""
        return not self.copying and not self.due

    def committed(self) -> None:
        """On the writer: count a commit; every :data:`CHECKPOINT_COMMITS`, copy the log
        aside."""
        self.commits += 1
        if self.commits < CHECKPOINT_COMMITS:
            return
        with self._lock:
            if self.copying:
                return
            self.commits, self.copying = 0, True
        try:
            self._thread.submit(self._aside_then_due)
        except RuntimeError:  # closing: the writer's own checkpoints are enough now
            self.copying = False

    def _aside_then_due(self) -> None:
        """On the checkpoint's thread: copy the log beside the writes; then the writer's part
        is due."""
        try:
            self.copy_aside()
        except Exception as exc:  # the writer's part copies what this one could not
            log.warning("database.checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.copying = False
            self.due = True
        self._writer_due()

    def copy_aside(self) -> None:
        """A PASSIVE checkpoint on the checkpoint's own connection."""
        if self._aside is None:
            self._aside = sqlite3.connect(self.path, check_same_thread=False)
            self._aside.execute("PRAGMA synchronous=NORMAL")
        self._aside.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def finish(self, writer: Callable[[], sqlite3.Connection]) -> None:
        """On the writer's thread, with ``writer()`` its connection: copy the rest of the log
        (nothing is written meanwhile, so it reaches the log's end)."""
        try:
            _busy, frames, copied = writer().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self._watch(held=copied < frames)
        except Exception as exc:  # the next one copies what this one could not
            log.warning("database.checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self.due = False

    def _watch(self, held: bool) -> None:
        """Report a log that grows because a reader holds checkpoints back, and its end."""
        if not held:
            if self._reported:
                log.info("database.log_caught_up", path=str(self.path))
                self._reported = 0
            return
        try:
            size = (self.path.parent / f"{self.path.name}-wal").stat().st_size
        except OSError:
            return
        if size >= max(self.warn_bytes, 2 * self._reported):
            self._reported = size
            log.warning(
                "database.log_growing",
                path=str(self.path),
                wal_mb=round(size / 2**20, 1),
                detail="a reader keeps an old snapshot (a sqlite3 shell left inside a "
                "transaction?): the write-ahead log cannot be copied back into the database, "
                "and grows with every write, until that transaction ends",
            )

    def close(self) -> None:
        """Wait for a copy under way, then close the checkpoint's connection (blocking)."""
        self._thread.shutdown(wait=True)
        if self._aside is not None:
            self._aside.close()
            self._aside = None
