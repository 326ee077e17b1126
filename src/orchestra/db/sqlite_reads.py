"""Point reads on the event loop's own ``sqlite3`` connection (:meth:`Database.read_now`).

A few indexed statements cost less run on the loop than the hop to a thread and back
(benchmarks/RESULTS.md). The loop's connection never waits for a lock (busy timeout 0): a
read SQLite cannot start at once fails with SQLITE_BUSY and runs again on a reader thread,
whose connection waits as long as the writer's does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class LoopReads:
    """Read-only ``sqlite3`` connections to ``path``, one per thread (the event loop's, each
    of ``threads`` reader threads'), opened on first use; ``handed_off()`` is called for each
    read that went to a reader thread."""

    def __init__(
        self, path: Path, busy_timeout_ms: int, threads: int, handed_off: Callable[[], None]
    ) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._threads = threads
        self._handed_off = handed_off
        self._lock = threading.Lock()
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """``read(connection)`` on the loop's connection, or on a reader thread's when SQLite
        is busy (raises what SQLite raises: the caller names it)."""
        try:
            return read(self._connection(0))
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
        self._handed_off()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self._threads, thread_name_prefix="orchestra-reader"
            )
        waiting = self._busy_timeout_ms
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: read(self._connection(waiting)))

    def _connection(self, busy_timeout_ms: int) -> sqlite3.Connection:
        """This thread's read-only connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,  # only so that close() may close it
            )
            conn.execute("PRAGMA query_only = ON")
            with self._lock:
                self._opened.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Stop the reader threads (once their reads end) and close every connection."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            opened, self._opened = self._opened, []
        self._local = threading.local()
        for conn in opened:
            conn.close()
