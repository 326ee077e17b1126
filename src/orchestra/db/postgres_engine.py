"""PostgreSQL: many writers, row locks, and LISTEN/NOTIFY for wake-ups across processes.

The driver is psycopg 3, for two reasons. Orchestra's transaction bodies are synchronous
SQLAlchemy Core (the same functions SQLite's writer runs), and psycopg serves them through
SQLAlchemy's synchronous engine on a few threads, while its asyncio connection serves
LISTEN and the async reads — one driver, one set of type rules. asyncpg is async only: every
transaction body would have to be written twice.

**Transactions** run on a pool of threads, each with its own connection, at READ COMMITTED.
Where SQLite's single writer made a read-then-write body atomic for free, here two bodies may
meet: PostgreSQL then reports a deadlock or a serialization failure, or a unique key taken by
the other (two processes registering the next version of a template). The body runs again,
a few times, with a short random pause (:data:`~orchestra.db.pg_failures.RETRY`); bodies only
touch the database, so running one again is safe. Guarded UPDATEs (``WHERE status = …``,
the lease's owner and attempt) are re-checked by PostgreSQL on the row's newest version, so
fencing holds as it does on SQLite. The claim locks the rows it takes with ``FOR UPDATE SKIP
LOCKED``: two processes never wait for each other's candidates.

**Wake-ups.** A submit sends a notification in its transaction (delivered at commit), and so
does every change of a task (:mod:`~orchestra.db.notices`). :meth:`PostgresDatabase.watch`
holds one connection that LISTENs and wakes the workers and the waiting requests of this
process. When that connection fails — or cannot exist, behind pgbouncer in
transaction mode — the workers' own poll still finds every task, only later; the listener
reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from orchestra import logs
from orchestra.db import notices
from orchestra.db.engine import POSTGRESQL, Database, server_params, settled
from orchestra.db.failures import WriteHealth
from orchestra.db.pg_failures import read_only, retryable, translate
from orchestra.errors import StorageError

log = logs.get("orchestra.db")

T = TypeVar("T")

#: Threads (each with its connection) running transactions and point reads.
WRITERS = 8
#: Connections of the async engine (the dashboard's and the listings' reads).
READERS = 4
#: How many times a transaction that met another runs in all.
ATTEMPTS = 6
#: The listener's pause before it reconnects, doubled after each failure up to the maximum.
LISTEN_RETRY = 0.5
LISTEN_RETRY_MAX = 30.0


def conninfo(url: str) -> str:
    """libpq's connection string for psycopg itself (the LISTEN connection), from a
    SQLAlchemy URL: the parameters SQLAlchemy's dialect gives the pools
    (:func:`~orchestra.db.engine.server_params`). The URL rendered as a libpq URI kept the
    multi-host form ``?host=h1:p1&host=h2:p2``, which libpq takes for one host named
    ``h2:p2``: the listener never connected ("failed to resolve host")."""
    return make_conninfo(**server_params(url))


#: Seconds to wait for a connection unless the URL says (``?connect_timeout=``): libpq waits
#: for ever, and an address that takes the connection but never answers held a start for
#: over two minutes, past a container's startup probe, before its error was shown.
CONNECT_TIMEOUT = 10
#: libpq's TCP keepalives and how long sent data may go unacknowledged, unless the URL says:
#: a connection whose server vanished (a failover to another address, a dropped NAT entry)
#: fails within about a minute; without them a read on it waited for ever, a /health check
#: among them. (Unix sockets have none.)
KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def connect_args(url: str, *, prepared_statements: bool = True) -> dict[str, Any]:
    """psycopg's connection settings the URL (and libpq's environment) leave out: a connect
    timeout, TCP keepalives (:data:`KEEPALIVES`), and a name that tells this process's
    connections apart in ``pg_stat_activity`` (``orchestra host:pid``). Without
    ``prepared_statements``, psycopg prepares none (for pgbouncer in transaction mode before
    1.21, where a prepared statement stays on whichever server connection ran it: "prepared
    statement "_pg3_0" does not exist")."""
    query = make_url(url).query
    args: dict[str, Any] = {} if prepared_statements else {"prepare_threshold": None}
    # libpq's own environment variables (PGCONNECT_TIMEOUT, PGAPPNAME) say it too.
    if "connect_timeout" not in query and not os.environ.get("PGCONNECT_TIMEOUT"):
        args["connect_timeout"] = CONNECT_TIMEOUT
    args |= {name: value for name, value in KEEPALIVES.items() if name not in query}
    if "application_name" not in query and not os.environ.get("PGAPPNAME"):
        args["application_name"] = f"orchestra {socket.gethostname()}:{os.getpid()}"[:63]
    return args


def _back_to_transactions(conn: Connection, raw: psycopg.Connection[Any]) -> None:
    """Turn autocommit off again before ``raw`` goes back to the writers' pool; a connection
    that cannot (it broke during the read) is thrown away, never handed on in autocommit.
    Never raises: the read's own result or error is what its caller gets."""
    try:
        raw.autocommit = False
    except psycopg.Error:
        conn.invalidate()


class PostgresDatabase(Database):
    """A PostgreSQL database shared by any number of processes (see the module docstring)."""

    dialect = POSTGRESQL
    notifies = True

    def __init__(self, url: str, *, prepared_statements: bool = True, **_options: Any) -> None:
        super().__init__(url)
        self.path = None
        # No pre-ping: it cost a round trip (0.3 ms of CPU) on every checkout. A connection
        # that died meanwhile (PostgreSQL restarted) fails its one operation, which reports a
        # StorageError, and SQLAlchemy then replaces every pooled connection opened before.
        #: What the URL leaves out (:func:`connect_args`), for every connection of the process.
        self._connect_args = connect_args(url, prepared_statements=prepared_statements)
        self._engine = create_engine(
            url,
            pool_size=WRITERS,
            max_overflow=0,
            pool_timeout=60,
            connect_args=self._connect_args,
        )
        #: This process's mark on the notifications it sends (:mod:`~orchestra.db.notices`).
        self.token = uuid.uuid4().hex[:12]
        token = self.token

        @event.listens_for(self._engine, "connect")
        def _mark(_dbapi: Any, record: Any) -> None:
            record.info["orchestra_token"] = token

        @event.listens_for(self._engine, "handle_error")
        def _read_only(context: Any) -> None:
            # A session opened under a database's or role's default_transaction_read_only
            # keeps it for its life: writes failed until a restart, long after the setting
            # was reset. Every pooled session was opened alike, so all are replaced (as for
            # a lost connection) and the next write opens one that sees the setting now; on
            # a standby (a failover), one that target_session_attrs sends to the primary.
            if read_only(context.original_exception):
                context.is_disconnect = True

        # Each read is one snapshot: REPEATABLE READ, set once per connection (a per-read SET
        # was two more round trips).
        self._reader = create_async_engine(
            url,
            pool_size=READERS,
            max_overflow=0,
            pool_timeout=60,
            isolation_level="REPEATABLE READ",
            connect_args=self._connect_args,
        )
        self._threads = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="orchestra-pg")
        self._replacing = threading.Lock()
        #: Transactions and reads on the threads: close() waits for them before it disposes.
        self._under_way: set[asyncio.Future[Any]] = set()
        self.writes = WriteHealth()
        self.on_recovered = None
        self.reads_handed_off = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set when writes work again: a listener waiting to reconnect tries at once.
        self._back: asyncio.Event | None = None
        #: How many times writes worked again after failing (one during a reconnect that
        #: then fails is not missed: that reconnect is tried again at once).
        self._recoveries = 0

    def _recovered(self) -> None:
        """On the loop: writes work again after failing (the server is back)."""
        self._recoveries += 1
        if self._back is not None:
            self._back.set()
        if self.on_recovered is not None:
            self.on_recovered()

    def _run(self, work: Callable[[Connection], T]) -> T:
        """On a thread: ``work`` in a transaction, run again when it met another."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self._engine.begin() as conn:
                    notices.begin(conn)
                    result = work(conn)
                    notices.send_and_commit(conn)
            except Exception as exc:
                if retryable(exc) and attempt < ATTEMPTS:
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                if read_only(exc) and attempt == 1:
                    continue  # once more, on a new session (see _read_only): writable now?
                error = translate(exc, self.where)
                if error is None:
                    raise
                if isinstance(error, StorageError):
                    self.writes.failed(error)
                raise error from exc
            if self.writes.succeeded() and self._loop:  # writes work again after failing
                self._loop.call_soon_threadsafe(self._recovered)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def transaction(self, work: Callable[[Connection], T], *, small: bool = False) -> T:
        """Run ``work(connection)`` as one transaction on a writer thread (see the module
        docstring). A caller cancelled meanwhile does not cut it short: it ends (committed or
        rolled back) before the cancel is raised."""
        self.refuse_when_closed()
        self._loop = loop = asyncio.get_running_loop()
        return await settled(self._on_threads(loop, self._run, work))

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction: one consistent snapshot (REPEATABLE READ) for every query
        inside it.

        Raises:
            StorageError: PostgreSQL cannot be reached or read, or the database is closed.
        """
        self.refuse_when_closed()
        try:
            async with self._reader.connect() as conn:
                try:
                    yield conn
                except BaseException:
                    await conn.rollback()
                    raise
                # COMMIT, not ROLLBACK: psycopg keeps the statements it prepared (see
                # _read_raw); the snapshot read nothing to keep or undo.
                await conn.commit()
        except StorageError:
            raise
        except Exception as exc:
            error = translate(exc, self.where)
            if error is None:
                raise
            raise error from exc

    def _read_raw(self, read: Callable[[Any], T]) -> T:
        """``read`` on a pooled connection in autocommit. A connection found dead (the server
        restarted) has the pool replaced, and the read (which changes nothing) is tried once
        more on a new connection."""
        for attempt in (1, 2):
            pool = self._engine.pool
            raw: psycopg.Connection[Any] | None = None
            try:
                with self._engine.connect() as conn:
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    # Autocommit, as SQLite's read_now: each statement its own snapshot, and
                    # no BEGIN and COMMIT around it (two round trips of three). Nor a ROLLBACK,
                    # at which psycopg forgets every statement it prepared on the connection:
                    # the writes that share these connections were parsed and planned again
                    # each time (the idle round trip: 20 ms -> 13 ms).
                    raw.autocommit = True
                    try:
                        return read(raw)
                    finally:
                        _back_to_transactions(conn, raw)
            except Exception as exc:
                broken = raw is not None and raw.broken
                if broken:
                    self._replace_pool(pool)
                    if attempt == 1:
                        continue
                error = translate(exc, self.where)
                if error is None:
                    raise
                raise error from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _replace_pool(self, pool: Any) -> None:
        """The server went away (a restart): every connection ``pool`` opened before is as
        dead. SQLAlchemy replaces them all when its own statement meets this; a read on the
        driver's connection is not its statement, so it is said here, once however many
        threads find out together (only while ``pool`` is still the engine's)."""
        with self._replacing:
            if self._engine.pool is pool:
                self._engine.dispose()

    async def read_now(self, read: Callable[[Any], T]) -> T:
        """Run ``read(psycopg_connection)`` on a writer thread's connection, in autocommit:
        each statement is its own snapshot, as on SQLite."""
        self.refuse_when_closed()
        loop = asyncio.get_running_loop()
        return await self._on_threads(loop, self._read_raw, read)

    def _on_threads(
        self, loop: asyncio.AbstractEventLoop, run: Callable[[Any], T], arg: Any
    ) -> asyncio.Future[T]:
        """``run(arg)`` on a writer thread, counted as under way until it ends."""
        future = loop.run_in_executor(self._threads, run, arg)
        self._under_way.add(future)
        future.add_done_callback(self._under_way.discard)
        return future

    async def ping(self) -> None:
        """Run a trivial query; raises if the database does not answer."""
        async with self.read() as conn:
            await conn.execute(text("SELECT 1"))

    async def watch(
        self, queued: Callable[[], None], changed: Callable[[Collection[int] | None, bool], None]
    ) -> None:
        """LISTEN for other processes' submits and changes and pass them on, until cancelled;
        reconnect with backoff when the connection fails (the workers and waiting requests
        poll meanwhile), and at once when a write works again (the server is back)."""
        pause = LISTEN_RETRY
        while True:
            recoveries = self._recoveries
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo(self.url), autocommit=True, **self._connect_args
                ) as conn:
                    for channel in notices.CHANNELS:
                        await conn.execute(f"LISTEN {channel}")
                    log.info("database.listening", token=self.token)
                    pause = LISTEN_RETRY
                    queued()  # what happened while nobody here listened
                    changed(None, False)
                    self.listening = True
                    async for note in conn.notifies():
                        token, _, detail = note.payload.partition(" ")
                        if token == self.token:
                            continue  # this process told itself already
                        if note.channel == notices.QUEUED_CHANNEL:
                            queued()
                        else:
                            progress = note.channel == notices.PROGRESS_CHANNEL
                            changed(notices.parse_changed(detail), progress)
            except asyncio.CancelledError:
                self.listening = False
                raise
            except Exception as exc:
                self.listening = False
                log.warning(
                    "database.listen_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=pause,
                )
            # The pause ends early once a write works again: the server is back.
            self._back = asyncio.Event()
            if self._recoveries != recoveries:  # back already, while this one connected
                self._back.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._back.wait()
            self._back = None
            pause = min(pause * 2, LISTEN_RETRY_MAX)

    async def close(self) -> None:
        """Close every connection; no transaction or read starts after this is called
        (:meth:`refuse_when_closed`)."""
        if self.closed:
            return
        self.closed = True
        if self._under_way:  # what was asked for before ends first
            await asyncio.wait(list(self._under_way))
        await asyncio.get_running_loop().run_in_executor(self._threads, self._engine.dispose)
        self._threads.shutdown(wait=True)
        await self._reader.dispose()
