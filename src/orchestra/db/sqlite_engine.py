"""Opening the database: pragmas, a serialized writer and a pool of readers.

SQLite allows one writer at a time. Rather than let concurrent writers collide and retry on
"database is locked", every write in this process goes through one connection on one thread,
and starts with BEGIN IMMEDIATE so that a writer in *another* process is waited
for (busy_timeout) at the start of the transaction instead of failing halfway. Readers use
their own connections; in WAL mode they never block the writer nor wait for it.

The writer's connection is driven with SQLAlchemy's synchronous Core: a write transaction is
a plain function (:meth:`Database.transaction`), and transactions run one at a time, in order
— that is the serialization. Large ones run on the writer's own thread. The small ones a
task's life is made of (a submit, a claim, a step, the end) run on the event loop itself when
the writer is idle: the hop to a thread and back cost more than they do (an enqueue took
0.68 ms of CPU with the hop, 0.32 without), and each hop added its latency to every task.
Either way, the transactions waiting together are committed together (group commit). The
loop never waits for a lock: when another process holds the write lock, the transaction goes
to the writer's thread, which waits. Checkpoints of the write-ahead log never run inside a
commit on the loop: most of one runs on a thread of its own beside the writes, the rest on the
writer's thread (:mod:`orchestra.db.sqlite_checkpoint`). (Through aiosqlite each statement
cost four thread hops; see benchmarks/RESULTS.md.)

Point reads (one task, its events, a page of a listing) run on the event loop's own
``sqlite3`` connection (:meth:`Database.read_now`: cheaper than the hop to a thread), which
never waits for a lock; when SQLite cannot start the read at once (rare in WAL mode), the read
runs on a reader thread instead, whose connection waits.

When SQLite itself fails — a full disk, a lock held by another connection past the busy
timeout, a read-only file, an I/O error — the caller gets a
:class:`~orchestra.errors.StorageError` saying so (``db.failures``), the writer rolls back and
is ready for the next transaction, and :attr:`Database.writes` remembers since when writes
fail, for /health; the file deleted or moved under it is told too (``db.sqlite_file``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import StaticPool

from orchestra import logs
from orchestra.db.engine import SQLITE, Database, check_url, settled
from orchestra.db.failures import WriteHealth, free_bytes, storage_error
from orchestra.db.sqlite_checkpoint import WAL_KEPT_BYTES, Checkpoints
from orchestra.db.sqlite_file import DatabaseFile
from orchestra.db.sqlite_reads import LoopReads
from orchestra.db.sqlite_setup import begin_waiting, create_private, reader_engine, setup
from orchestra.errors import StorageError, StorageFull

READ_POOL_SIZE = 4
#: What counts as room again after a full disk: free bytes on it, and pages below its limit.
ROOM_BYTES = 1024 * 1024
ROOM_PAGES = 256
#: Seconds between two looks for other processes' commits (:meth:`SqliteDatabase.watch`).
WATCH_INTERVAL = 0.05

log = logs.get("orchestra.db")


T = TypeVar("T")


#: How a transaction ended: (True, what it returned) or (False, what it raised).
_Outcome = tuple[bool, Any]
#: A transaction asked for: its body, its caller's future, whether it is small, and when it
#: was asked for (``time.monotonic()``: its wait for another process's lock counts from then).
_Pending = tuple[Callable[[Connection], Any], asyncio.Future[Any], bool, float]


class _Busy(Exception):
    """Another connection holds the write lock, and the BEGIN was not to wait for it."""


def _settle(futures: list[asyncio.Future[Any]], outcomes: list[_Outcome]) -> None:
    for future, (ok, value) in zip(futures, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SqliteDatabase(Database):
    """A SQLite file: one writer (this process's), readers beside it (see the module
    docstring)."""

    dialect = SQLITE
    commits_together = True

    path: Path

    def __init__(
        self, url: str, *, busy_timeout_ms: int = 5000, synchronous: str = "normal", **_: Any
    ) -> None:
        super().__init__(url)
        self.path = check_url(url)
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            log.info("database.folder_created", folder=str(self.path.parent.absolute()))
        if create_private(self.path):
            log.info("database.file_created", path=str(self.path.absolute()))
        self.file = DatabaseFile(self.path)
        # One connection, used only on the writer's thread.
        self._writer = create_engine(
            f"sqlite:///{self.path}",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        setup(
            self._writer,
            begin="BEGIN IMMEDIATE",
            busy_timeout_ms=busy_timeout_ms,
            synchronous=synchronous,
        )
        # FULL: each commit waits for an fsync, which the event loop must not (small ones too).
        self._on_loop = synchronous != "full"
        # Checkpoints run beside the writes and on the writer's thread between groups
        # (sqlite_checkpoint), never in a commit.
        # A log grown while a reader held checkpoints back is cut back when it starts over.
        event.listen(self._writer, "connect", _no_commit_checkpoints)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestra-writer")
        #: Whether the latest group that committed changed rows (wrote to the file).
        self._wrote = False
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        #: A drain is scheduled or running (on the loop or the writer's thread): the writer's
        #: connection is in use, and new transactions join its queue.
        self._draining = False
        #: Checkpoints of the write-ahead log (their ``due`` is read under ``_lock``).
        self.checkpoints = Checkpoints(self.path, self._lock, self._writer_due)
        #: The event loop the transactions come from (the writer's thread answers there).
        self._loop: asyncio.AbstractEventLoop | None = None
        # The file as check_url found it (a leading ~ expanded), for the reads as for the writer.
        expanded = make_url(url).set(database=str(self.path)).render_as_string(hide_password=False)
        self._reader = reader_engine(
            expanded, pool_size=READ_POOL_SIZE, busy_timeout_ms=busy_timeout_ms
        )
        self._busy_timeout_ms = busy_timeout_ms
        self.reads_handed_off = 0
        self._loop_reads = LoopReads(self.path, busy_timeout_ms, READ_POOL_SIZE, self._handed_off)
        self.writes = WriteHealth()
        self.on_recovered = None

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._writer.connect()
        return self._conn

    def _drain(self, loop: asyncio.AbstractEventLoop, *, busy: bool = False) -> None:
        """On the writer's thread: run the transactions asked for so far, committed together,
        until none is left; then hand the outcomes back to the event loop in one call. A
        checkpoint that is due runs first.

        Small transactions at the head of the queue go back to the loop (:meth:`_drain_here`)
        unless ``busy`` (another process held the write lock: here they wait for it). Kept
        here, the small writes of a busy service stayed on this thread after each checkpoint,
        and the loop waited for this thread's turn at the GIL on every commit (up to 5 ms).
        """
        while True:
            if self.checkpoints.due:
                self._finish_checkpoint()
            with self._lock:
                if self._pending and self._pending[0][2] and not busy:
                    loop.call_soon_threadsafe(self._drain_here, loop)
                    return
                batch, self._pending = self._pending, []
                if not batch:
                    if self.checkpoints.due:  # asked for since the look above
                        continue
                    self._draining = False
                    return
            outcomes = self._run_group(batch, wait=True)
            recovered = self._note_health(outcomes)
            busy = False
            with self._lock:
                # Idle before the callers hear back, so that what they write next can run on
                # the loop; the connection is not touched below.
                done = not self._pending and not self.checkpoints.due
                if done:
                    self._draining = False
            loop.call_soon_threadsafe(_settle, [future for _, future, _, _ in batch], outcomes)
            if recovered and self.on_recovered is not None:
                loop.call_soon_threadsafe(self.on_recovered)
            if done:
                return

    def _drain_here(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop, once the transactions asked for in this turn of the loop are
        queued: commit the small ones together here, without waiting for a lock; hand what
        cannot run here (a large transaction, or any while another process holds the write
        lock) to the writer's thread."""
        with self._lock:
            small = 0
            while small < len(self._pending) and self._pending[small][2]:
                small += 1
            batch, self._pending = self._pending[:small], self._pending[small:]
        if batch:
            try:
                outcomes = self._run_group(batch, wait=False)
            except _Busy:
                with self._lock:
                    self._pending[:0] = batch
                self._thread.submit(functools.partial(self._drain, loop, busy=True))
                return
            recovered = self._note_health(outcomes)
            _settle([future for _, future, _, _ in batch], outcomes)
            if recovered and self.on_recovered is not None:
                self.on_recovered()
        with self._lock:
            if not self._pending and not self.checkpoints.due:
                self._draining = False
                return
        self._thread.submit(self._drain, loop)  # what is left, after a checkpoint if one is due

    def _run_group(self, batch: list[_Pending], *, wait: bool) -> list[_Outcome]:
        """Commit ``batch`` together (see :meth:`_commit_group`): each outcome, failures of
        SQLite as StorageErrors."""
        try:
            # The lock is waited for up to busy_timeout_ms from when the oldest of them was
            # asked for: one queued behind a group that waited in vain does not wait again.
            waited_ms = (time.monotonic() - min(asked for *_, asked in batch)) * 1000
            outcomes = self._commit_group(
                [work for work, *_ in batch],
                wait=wait,
                wait_ms=max(0.0, self._busy_timeout_ms - waited_ms),
            )
        except _Busy:
            raise
        except BaseException as exc:  # not an error of one unit: fail the group, go on
            outcomes = [(False, exc)] * len(batch)
        return [self._storage_outcome(outcome) for outcome in outcomes]

    def _note_health(self, outcomes: list[_Outcome]) -> bool:
        """Remember how the group went; True when writes work again after failing (a group
        that changed rows committed).

        A full disk is over only once the file grew or there is room again: small writes that
        fit in pages already there (a lease renewal, an empty UPDATE) succeed on a full disk.
        """
        failures = [v for ok, v in outcomes if not ok and isinstance(v, StorageError)]
        if failures:
            self.writes.failed(failures[-1], self._pragma("page_count"))
            return False
        failure = self.writes.failure
        if failure is None or not self._wrote:  # an idle claim is not a write that worked
            return False
        if isinstance(failure.error, StorageFull) and not self._room_since(failure.pages):
            return False
        return self.writes.succeeded()

    def _room_since(self, pages_then: int | None) -> bool:
        """Whether the file grew since it had ``pages_then`` pages, or has room to grow now:
        a megabyte free on its disk and below its page limit."""
        pages = self._pragma("page_count")
        if pages is None:
            return True
        if pages_then is not None and pages > pages_then:
            return True
        free = free_bytes(self.path)
        limit = self._pragma("max_page_count")
        below_limit = limit is None or limit - pages >= ROOM_PAGES
        return (free is None or free >= ROOM_BYTES) and below_limit

    def _pragma(self, name: str) -> int | None:
        """A number SQLite keeps for the file (on the writer's thread); None if it fails."""
        try:
            raw = self._connection().connection.driver_connection
            return int(raw.execute(f"PRAGMA {name}").fetchone()[0])  # type: ignore[union-attr]
        except Exception:
            return None

    def _storage_outcome(self, outcome: _Outcome) -> _Outcome:
        """A failure of SQLite itself as the StorageError it stands for."""
        ok, value = outcome
        if ok or not isinstance(value, Exception) or isinstance(value, StorageError):
            return outcome
        error = storage_error(value, self.path)
        if error is None:
            return outcome
        error.__cause__ = value
        return (False, error)

    def _commit_group(
        self,
        works: list[Callable[[Connection], Any]],
        *,
        wait: bool = True,
        wait_ms: float | None = None,
    ) -> list[_Outcome]:
        """One BEGIN IMMEDIATE … COMMIT around ``works``, each inside a SAVEPOINT so that one
        that raises is rolled back alone.

        When a unit's failure made SQLite roll back the whole transaction (a full disk, an I/O
        error), that unit fails and the others run again without it, in a new transaction:
        one write too big for the disk does not fail the small ones grouped with it.

        Without ``wait``, the BEGIN does not wait for a write lock another connection holds:
        it raises :class:`_Busy` at once, and nothing was done. With it, it waits up to
        ``wait_ms`` (the busy timeout when None).
        """
        outcomes: list[_Outcome] = []
        try:
            conn = self._connection()
            raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
            self._begin(raw, wait=wait, wait_ms=wait_ms)  # BEGIN IMMEDIATE
            changes = raw.total_changes
            if len(works) == 1:  # alone: its failure rolls back the transaction, no savepoint
                try:
                    outcomes.append((True, works[0](conn)))
                except Exception as exc:
                    self._recover()
                    return [(False, exc)]
            else:
                for index, work in enumerate(works):
                    raw.execute("SAVEPOINT unit")
                    try:
                        outcomes.append((True, work(conn)))
                    except Exception as exc:
                        if not raw.in_transaction:  # nothing of the group is written any more
                            self._recover()
                            rest = works[:index] + works[index + 1 :]
                            others = self._commit_group(rest, wait=wait)
                            return [*others[:index], (False, exc), *others[index:]]
                        raw.execute("ROLLBACK TO unit")
                        outcomes.append((False, exc))
                    raw.execute("RELEASE unit")
            if not raw.in_transaction:  # a unit caught the error of SQLite's own rollback
                raise RuntimeError("SQLite rolled the transaction back: nothing was written")
            if conn.in_transaction():  # a unit ran Core: SQLAlchemy joined the transaction
                conn.commit()
            else:
                raw.execute("COMMIT")
        except _Busy:
            raise
        except Exception as exc:
            self._recover()
            return [(False, exc)] * len(works)
        self.checkpoints.committed()
        # A group that changed nothing wrote nothing (SQLite commits it without touching the
        # file): it shows nothing about whether writes work.
        self._wrote = raw.total_changes > changes
        return outcomes

    def _begin(self, raw: sqlite3.Connection, *, wait: bool, wait_ms: float | None = None) -> None:
        """BEGIN IMMEDIATE, on the sqlite3 connection itself (through SQLAlchemy, its begin
        and commit cost a group on the loop more than its statements did); without ``wait``,
        with no busy timeout, raising :class:`_Busy` when another connection holds the write
        lock."""
        if wait:
            begin_waiting(raw, self._busy_timeout_ms, within_ms=wait_ms)
            return
        raw.execute("PRAGMA busy_timeout = 0")
        try:
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            self._recover()
            raise _Busy() from exc
        finally:
            raw.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")

    def _writer_due(self) -> None:
        """From the checkpoint's thread: the writer's part of a checkpoint is due; start the
        writer's thread if it is idle (else its drain does it before its next group)."""
        with self._lock:
            start = not self._draining and self._loop is not None
            if start:
                self._draining = True
        if start:
            assert self._loop is not None
            self._thread.submit(self._drain, self._loop)

    def _finish_checkpoint(self) -> None:
        """On the writer's thread: the writer's part of a due checkpoint."""
        self.checkpoints.finish(self._raw_writer)

    def _raw_writer(self) -> sqlite3.Connection:
        """The writer's ``sqlite3`` connection (opened if it is not)."""
        return self._connection().connection.driver_connection  # type: ignore[return-value]

    def _recover(self) -> None:
        """After a failed statement or COMMIT, leave the writer ready for the next group.

        SQLite may have rolled the transaction back itself (a full disk, an I/O error), or
        kept it open (a failed COMMIT); SQLAlchemy keeps its own transaction object either
        way, and refuses the next BEGIN until it is rolled back. So both are rolled back; if
        even that fails, the connection is dropped and the next group opens a new one.
        """
        conn = self._conn
        if conn is None:
            return
        try:
            raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
            conn.rollback()
            if raw.in_transaction:
                raw.execute("ROLLBACK")
        except Exception as exc:
            log.warning("database.writer_reconnects", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                conn.invalidate()
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None

    async def transaction(self, work: Callable[[Connection], T], *, small: bool = False) -> T:
        """Run ``work(connection)`` as one write transaction on the writer's thread: committed
        when this returns, rolled back when it raises.

        ``work`` is synchronous (SQLAlchemy Core on a plain connection) and must only touch the
        database. Transactions run one at a time, in the order they were asked for.

        **Group commit.** Transactions asked for while the writer is busy wait for it and then
        run together: one BEGIN IMMEDIATE, each inside its own SAVEPOINT (one that raises is
        rolled back alone), one COMMIT. Nobody is answered before the COMMIT that holds their
        work, so the guarantee is the same as one transaction each; what is saved is a BEGIN
        and a COMMIT (and a thread hop) per transaction under load.

        A caller cancelled meanwhile does not cut a transaction short: it finishes (committed or
        rolled back) before the cancel is raised, so the caller never guesses whether it
        happened.

        **Small transactions** (``small``: a few indexed rows, as each step of a task writes)
        run on the event loop itself when the writer is idle: those asked for in one turn of
        the loop are committed together at its end, without a hop to the thread and back,
        which costs more than they do. If another process holds the write lock, they go to
        the writer's thread, which waits for it.
        """
        self.refuse_when_closed()
        self.file.refuse_writes()
        return await self._queued(work, small)

    async def _queued(self, work: Callable[[Connection], T], small: bool) -> T:
        """Queue ``work`` for the writer (see :meth:`transaction`) and wait for its end."""
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        small = small and self._on_loop
        with self._lock:
            self._pending.append((work, future, small, time.monotonic()))
            start = not self._draining
            self._draining = True
        if start:
            if small:
                # It commits other callers' writes too: not in this caller's context.
                loop.call_soon(self._drain_here, loop, context=contextvars.Context())
            else:
                self._thread.submit(self._drain, loop)
        return await settled(future)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction: one consistent snapshot for every query inside it.

        Raises:
            StorageError: SQLite cannot read the file (an I/O error, a lock, a bad file), or
                the database is closed.
        """
        self.refuse_when_closed()
        try:
            async with self._reader.connect() as conn:
                try:
                    yield conn
                finally:
                    await conn.rollback()
        except Exception as exc:
            error = storage_error(exc, self.path)
            if error is None:
                raise
            raise error from exc

    async def read_now(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read(connection)`` — a few indexed statements, each read to its end
        (``fetchall``) — on this thread's own ``sqlite3`` connection, without leaving the
        event loop; when SQLite is busy, on a reader thread instead (``db.sqlite_reads``).
        Each statement is its own snapshot (autocommit, ``query_only``): a read that needs one
        view of several rows says it in one statement.

        Raises:
            StorageError: SQLite cannot read the file (an I/O error, a lock held past the
                busy timeout, a bad file), or the database is closed.
        """
        self.refuse_when_closed()
        try:
            return await self._loop_reads.run(read)
        except Exception as exc:
            error = storage_error(exc, self.path)
            if error is None:
                raise
            raise error from exc

    def _handed_off(self) -> None:
        self.reads_handed_off += 1

    async def ping(self) -> None:
        """Run a trivial query; raises if the database does not answer."""
        async with self.read() as conn:
            await conn.execute(text("SELECT 1"))

    def free_mb(self) -> float | None:
        """Free space on the database's disk, in MB (None when it cannot be told)."""
        return self.file.free_mb()

    def replaced(self) -> str | None:
        """The file deleted, moved or replaced under this process (None: it is not)."""
        return self.file.replaced()

    async def watch(
        self, queued: Callable[[], None], changed: Callable[[Collection[int] | None, bool], None]
    ) -> None:
        """Notice other processes' commits (``PRAGMA data_version`` on the writer's
        connection, which this process's own commits leave alone), every
        :data:`WATCH_INTERVAL` seconds while the writer is idle, and pass them on as "tasks may
        have been queued" and "any task may have changed", until cancelled."""
        last: int | None = None
        self.listening = True
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self._draining:  # the writer's connection is in use; look next time
                continue
            version = self._pragma("data_version")
            if version is not None and last is not None and version != last:
                queued()
                changed(None, False)
            last = version

    async def close(self) -> None:
        """Close every connection, once the transactions asked for so far have ended; none
        starts after this is called (:meth:`refuse_when_closed`)."""

        def close_writer() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._writer.dispose()

        if self.closed:
            return
        self.closed = True
        if self._draining:  # transactions still queued: let them end first (in order)
            with contextlib.suppress(Exception):
                await self._queued(lambda _conn: None, small=False)
        # A copy aside ends before the writer closes (waited for off the loop).
        await asyncio.to_thread(self.checkpoints.close)
        await asyncio.get_running_loop().run_in_executor(self._thread, close_writer)
        self._thread.shutdown(wait=True)
        self._loop_reads.close()
        await self._reader.dispose()


def _no_commit_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    """The writer's connection: no checkpoint in a commit, and a log cut back to
    :data:`WAL_KEPT_BYTES` when it starts over."""
    dbapi_connection.execute("PRAGMA wal_autocheckpoint = 0")
    dbapi_connection.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
