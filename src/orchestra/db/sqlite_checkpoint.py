"""Checkpoints of a SQLite file's write-ahead log, kept out of the writes' way.

No commit checkpoints (the writer sets ``wal_autocheckpoint`` 0: on the event loop a
checkpoint would hold it). A checkpoint is mostly copying pages and syncing the disk (7.8 ms a
hundred commits' pages here, 0.3 ms without the sync), and a PASSIVE one takes no lock a writer
needs. So every :data:`CHECKPOINT_COMMITS` commits, or sooner once the log has outgrown
:data:`WAL_KEPT_BYTES` (a few tasks with a megabyte of text each write more log than a hundred
small ones: it reached 0.5 GB between two checkpoints), :class:`Checkpoints` first copies the
log into the database file on a thread and connection of its own, beside the writes; then the
writer's thread copies only what was committed meanwhile, before its next group, so that the
log starts over. Only that short part holds the writes (all of it did, when it ran on the
writer's thread alone).

A reader that keeps an old snapshot (a ``sqlite3`` shell left inside a transaction) stops
every checkpoint short of the log's end, and the log grows with every write until it ends;
reads that never pause can do the same. The writer's part says which in the log
(``database.log_growing``, at 64 MiB, then at each doubling), and once the reads stop the log
starts over and is cut back to :data:`WAL_KEPT_BYTES` (the writer's ``journal_size_limit``):
it did not shrink.
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
#: Growth of the log past :data:`WAL_KEPT_BYTES` between two checkpoints its size makes due
#: (a log held back by a reader grows on, and is not checkpointed at every commit for it).
WAL_STEP_BYTES = 16 * 1024 * 1024
#: The log's size past which a checkpoint a reader holds back is reported (then at each
#: doubling).
WAL_WARN_BYTES = 64 * 1024 * 1024

log = logs.get("orchestra.db")

_OLD_SNAPSHOT = (
    "a reader keeps an old snapshot (a sqlite3 shell left inside a transaction?): the "
    "write-ahead log cannot be copied back into the database, and grows with every write, "
    "until that transaction ends"
)
_READS_UNDER_WAY = (
    "reads under way keep the write-ahead log from starting over (the service's own, serving "
    "big results, or another program's): it grows while one read always overlaps the next, "
    "and starts over at the first pause in reads"
)


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
        #: The log's salts and its frames copied back, at the last checkpoint.
        self._salt_seen: bytes | None = None
        self._copied_seen = 0
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
        self._wal = path.parent / f"{path.name}-wal"
        #: The log's size at the last commit, and the size that makes a checkpoint due.
        self._wal_size = 0
        self._due_size = WAL_KEPT_BYTES

    @property
    def idle(self) -> bool:
        """Neither part of a checkpoint is under way or due."""
        return not self.copying and not self.due

    def committed(self) -> None:
        """On the writer: count a commit; every :data:`CHECKPOINT_COMMITS`, or when the log
        has grown past :attr:`_due_size`, copy the log aside."""
        self.commits += 1
        grown = self._grown()
        if self.commits < CHECKPOINT_COMMITS and not grown:
            return
        with self._lock:
            if self.copying:
                return
            self.commits, self.copying = 0, True
        if grown:  # the next one when it has grown as much again, if it cannot start over
            self._due_size = self._wal_size + WAL_STEP_BYTES
        try:
            self._thread.submit(self._aside_then_due)
        except RuntimeError:  # closing: the writer's own checkpoints are enough now
            self.copying = False

    def _grown(self) -> bool:
        """The log's file is larger than :attr:`_due_size` (one ``stat``, about a
        microsecond). The file only grows when the log outgrows it: it is reused from its
        start once the log starts over, and cut back to :data:`WAL_KEPT_BYTES` when larger."""
        try:
            size = self._wal.stat().st_size
        except OSError:
            return False
        if size < self._wal_size:  # cut back: the log started over
            self._due_size = WAL_KEPT_BYTES
        self._wal_size = size
        return size > self._due_size

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
            self._watch(frames, copied)
        except Exception as exc:  # the next one copies what this one could not
            log.warning("database.checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self.due = False

    def _watch(self, frames: int, copied: int) -> None:
        """Report a log that grows because it cannot start over, and its end.

        The log's header has new salts each time it starts over. A reader keeping an old
        snapshot stops every checkpoint at the same frame; reads under way (the service's
        own, serving big results) let each go further, or to the end, and still keep the log
        from starting over, so long as one is always there."""
        salt = self._salt()
        same_log = salt is not None and salt == self._salt_seen
        stuck = same_log and copied < frames and copied == self._copied_seen
        self._salt_seen, self._copied_seen = salt, copied
        if not same_log:
            if self._reported:
                log.info("database.log_caught_up", path=str(self.path))
                self._reported = 0
            return
        size = self._wal.stat().st_size
        if size >= max(self.warn_bytes, 2 * self._reported):
            self._reported = size
            log.warning(
                "database.log_growing",
                path=str(self.path),
                wal_mb=round(size / 2**20, 1),
                detail=_OLD_SNAPSHOT if stuck else _READS_UNDER_WAY,
            )

    def _salt(self) -> bytes | None:
        """The salts in the log's header (``None``: no log)."""
        try:
            with self._wal.open("rb") as wal:
                header = wal.read(24)
        except OSError:
            return None
        return header[16:24] if len(header) == 24 else None

    def close(self) -> None:
        """Wait for a copy under way, then close the checkpoint's connection (blocking)."""
        self._thread.shutdown(wait=True)
        if self._aside is not None:
            self._aside.close()
            self._aside = None


def truncate_log(path: Path, wait_s: float = 1.0) -> None:
    """Copy the whole write-ahead log of the file at ``path`` into it and empty the log
    (``wal_checkpoint(TRUNCATE)``), on a connection of its own (blocking): once, after a
    migration, which leaves a log as large as what it wrote until the next write, and the
    disk space with it. Best effort: a reader (another program's) may hold the log; that is
    logged (info), and the writes' checkpoints copy it later."""
    try:
        conn = sqlite3.connect(path, timeout=wait_s)
        try:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.info("database.log_not_emptied", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return
    if busy:
        log.info(
            "database.log_not_emptied",
            path=str(path),
            error=f"a reader holds the write-ahead log ({copied} of {frames} pages copied)",
        )
