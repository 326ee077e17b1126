"""Two processes' connections on one database (each ``Database`` stands for one process): the
claim never hands a task to both, templates and migrations never collide, and a submit in one
wakes the workers of the other (PostgreSQL's LISTEN/NOTIFY; SQLite's data_version)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

import msgspec
import psycopg
import pytest
import structlog
from sqlalchemy import Connection, text

from orchestra.config import ServerSettings, Settings
from orchestra.db import Database, Lease, TaskStore, notices
from orchestra.db.schema import LATEST, upgrade
from orchestra.db.templates import TemplateStore
from orchestra.domain import NewTask, TaskStatus
from tests.conftest import StartService, sql_rows
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer
from tests.fixtures.servers import load_slack, wait_until

postgresql_only = pytest.mark.skipif(not ON_POSTGRESQL, reason="LISTEN/NOTIFY is PostgreSQL's")


@pytest.fixture
async def two(db_url: str) -> AsyncIterator[tuple[Database, Database]]:
    first, second = Database(db_url), Database(db_url)
    await upgrade(first)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


@pytest.mark.empty_database
async def test_processes_migrating_together_both_start(db_url: str) -> None:
    databases = [Database(db_url) for _ in range(3)]
    try:
        versions = await asyncio.gather(*(upgrade(db) for db in databases))
    finally:
        for db in databases:
            await db.close()
    assert versions == [LATEST] * 3
    recorded = sql_rows(db_url, "SELECT version FROM schema_version ORDER BY version")
    assert [v for (v,) in recorded] == list(range(1, LATEST + 1))  # each migration once


async def test_claims_from_two_processes_never_share_a_task(
    two: tuple[Database, Database],
) -> None:
    a, b = TaskStore(two[0]), TaskStore(two[1])
    assert await a.claim("w", 1, 30) == await b.claim("w", 1, 30) == []  # both connected
    for _ in range(200):
        await a.enqueue(NewTask(template="t", template_version=1, params={}))

    async def drain(store: TaskStore, owner: str) -> list[int]:
        got: list[int] = []
        while batch := await store.claim(owner, 3, 30):
            got.extend(t.id for t in batch)
        return got

    results = await asyncio.gather(*(drain(s, f"w{i}") for i, s in enumerate([a, b, a, b])))
    claimed = Counter(i for ids in results for i in ids)
    assert len(claimed) == 200
    assert set(claimed.values()) == {1}
    assert all(results)  # every claimer got some: nobody waited out the others


async def test_two_processes_registering_one_template_get_distinct_versions(
    two: tuple[Database, Database],
) -> None:
    stores = [TemplateStore(two[0]), TemplateStore(two[1])]
    results = await asyncio.gather(
        *(stores[i % 2].register("shared", f"body {i}", f"hash {i}") for i in range(12))
    )
    assert sorted(r.version for r in results) == list(range(1, 13))


class Woken:
    """What ``Database.watch`` passed on: queued wake-ups, and the tasks said to change."""

    def __init__(self) -> None:
        self.queued = asyncio.Event()
        self.changed: list[list[int] | None] = []
        self.progress: list[bool] = []
        self.queued_count = 0
        self.any_change = asyncio.Event()

    def on_queued(self) -> None:
        self.queued_count += 1
        self.queued.set()

    def on_changed(self, ids: Collection[int] | None, progress: bool) -> None:
        self.changed.append(None if ids is None else sorted(ids))
        self.progress.append(progress)
        self.any_change.set()

    def clear(self) -> None:
        self.queued.clear()
        self.any_change.clear()
        self.changed.clear()
        self.progress.clear()
        self.queued_count = 0


@asynccontextmanager
async def watching(db: Database) -> AsyncIterator[Woken]:
    """``db.watch`` running (as another process's listener does), what it passes on collected
    in a :class:`Woken`, until the block ends."""
    woken = Woken()
    listener = asyncio.create_task(db.watch(woken.on_queued, woken.on_changed))
    try:
        yield woken
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_a_submit_in_one_process_wakes_the_workers_of_another(
    two: tuple[Database, Database],
) -> None:
    async with watching(two[1]) as woken:
        if ON_POSTGRESQL:
            await asyncio.wait_for(woken.queued.wait(), 10)  # the first: once it listens
        else:
            await asyncio.sleep(0.2)  # the watcher has read the version once
        woken.clear()
        task = (
            await TaskStore(two[0]).enqueue(NewTask(template="t", template_version=1, params={}))
        ).task
        await asyncio.wait_for(woken.queued.wait(), 5)
        await asyncio.wait_for(woken.any_change.wait(), 5)
        # PostgreSQL names the task; SQLite knows only that something changed.
        assert woken.changed[-1] in ([task.id], None)
        if ON_POSTGRESQL:
            assert woken.changed[-1] == [task.id]


async def test_a_process_is_not_woken_by_its_own_writes(
    two: tuple[Database, Database],
) -> None:
    async with watching(two[0]) as woken:
        if ON_POSTGRESQL:
            await asyncio.wait_for(woken.queued.wait(), 10)
        else:
            await asyncio.sleep(0.2)
        woken.clear()
        await TaskStore(two[0]).enqueue(NewTask(template="t", template_version=1, params={}))
        # Then a write by the other, which must arrive: the first one, if it had come, would
        # have come before it.
        await TaskStore(two[1]).enqueue(NewTask(template="t", template_version=1, params={}))
        await asyncio.wait_for(woken.queued.wait(), 5)
        await asyncio.wait_for(woken.any_change.wait(), 5)
        await asyncio.sleep(0.2)
        assert woken.changed in ([[2]], [None])  # only the other process's task


@postgresql_only
async def test_another_process_tells_progress_apart_from_changes_that_may_end_a_task(
    two: tuple[Database, Database],
) -> None:
    # A wait for a task's end sleeps through its progress; so it must, when the task runs in
    # another process: its claim and steps are told as progress, its end as a change.
    async with watching(two[1]) as woken:
        await asyncio.wait_for(woken.queued.wait(), 10)
        store = TaskStore(two[0])
        task = (await store.enqueue(NewTask(template="t", template_version=1, params={}))).task
        await wait_until(lambda: [task.id] in woken.changed)
        woken.clear()
        [claimed] = await store.claim("w", 1, 30, first_step=lambda _task: "first")
        await wait_until(lambda: len(woken.changed) == 1)
        assert (woken.changed, woken.progress) == ([[task.id]], [True])
        lease = Lease(task_id=task.id, owner="w", attempt=claimed.attempts)
        assert await store.finish(lease, TaskStatus.SUCCEEDED, result="done")
        await wait_until(lambda: len(woken.changed) == 2)
        assert (woken.changed[1], woken.progress[1]) == ([task.id], False)


@postgresql_only
async def test_the_listener_comes_back_after_its_connection_is_cut(
    two: tuple[Database, Database], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestra.db import postgres_engine

    monkeypatch.setattr(postgres_engine, "LISTEN_RETRY", 0.05)
    async with watching(two[1]) as woken:
        await asyncio.wait_for(woken.queued.wait(), 10)
        woken.clear()
        sql_rows(
            db_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        )
        await asyncio.wait_for(woken.queued.wait(), 10)  # listening again: it catches up
        woken.clear()
        await TaskStore(two[0]).enqueue(NewTask(template="t", template_version=1, params={}))
        await asyncio.wait_for(woken.queued.wait(), 5)


GREET = """name: greet
parameters:
  who: {type: string}
steps:
  - id: hello
    kind: render
    text: "hello {{ params.who }}"
"""


async def test_a_template_registered_in_one_process_runs_in_another(
    settings: Settings, start_service: StartService
) -> None:
    """The API-only process registers a template and takes a task of it; the worker-only
    process, idle and polling only every 30 s, is woken, learns the template, and runs it."""
    api_only = msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, workers=False)
    )
    slow_poll = msgspec.structs.replace(
        settings, workers=msgspec.structs.replace(settings.workers, poll_interval=30.0)
    )
    async with start_service(slow_poll) as workers, start_service(api_only) as api:
        assert (await workers.client.get("/api/v1/templates/greet")).status_code == 404
        registered = await api.client.post("/api/v1/templates", content=GREET)
        assert registered.status_code == 201, registered.text
        started = asyncio.get_running_loop().time()
        task = await api.submit("greet", who="there")
        done = await api.wait(task["id"])
        assert done["status"] == "succeeded", done
        assert done["result"] == "hello there"
        assert asyncio.get_running_loop().time() - started < 15  # woken, not its 30 s poll
        [attempt] = done["attempts"]
        assert attempt["worker"] == workers.app.runtime.pool.owner


@postgresql_only
async def test_the_service_recovers_when_postgresql_restarts(
    settings: Settings, start_service: StartService, postgres: PostgresServer
) -> None:
    """Every pooled connection dies with the server. Pools are not pinged before each use
    (a round trip per transaction), so an operation on a dead connection fails with a clear
    503, never a 500, and the next ones work: submits, the workers and the LISTEN wake-ups."""
    async with start_service(settings) as svc:
        first = await svc.submit("summarize", text="before")
        assert (await svc.wait(first["id"]))["status"] == "succeeded"
        postgres.restart()
        statuses: list[int] = []
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            response = await svc.client.post(
                "/api/v1/tasks", json={"template": "summarize", "params": {"text": "after"}}
            )
            statuses.append(response.status_code)
            if response.status_code == 201:
                break
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "storage_unavailable", response.text
            await asyncio.sleep(0.1)
        assert statuses[-1] == 201, statuses
        done = await svc.wait(response.json()["id"])
        assert done["status"] == "succeeded", done


@postgresql_only
async def test_after_a_restart_point_reads_work_without_one_failure_per_pooled_connection(
    settings: Settings, start_service: StartService, postgres: PostgresServer, db_url: str
) -> None:
    """A point read (GET /api/v1/tasks/{id}) runs on a pooled connection of its own; the
    first one to find its connection dead has the pool replaced and reads again on a new
    one, so no read fails (they failed once per pooled connection, minutes after PostgreSQL
    was back)."""
    api_only = msgspec.structs.replace(settings, server=ServerSettings(workers=False))
    async with start_service(api_only) as svc:
        task = await svc.submit("summarize", text="kept")
        url = f"/api/v1/tasks/{task['id']}"
        # Every pooled connection in use once.
        answers = await asyncio.gather(*(svc.client.get(url) for _ in range(24)))
        assert {a.status_code for a in answers} == {200}
        named = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'orchestra %'"
        assert sql_rows(db_url, named)[0][0] > 0  # this process's, told apart in psql
        sql_rows(db_url, "CHECKPOINT")  # the test server's commits are not flushed at once
        postgres.restart()
        statuses = [(await svc.client.get(url)).status_code for _ in range(12)]
        assert statuses == [200] * 12, statuses


async def test_an_api_only_process_keeps_no_wake_up_times(
    settings: Settings, start_service: StartService
) -> None:
    """With --no-workers the pool never runs, so the wake-up time of each delayed submit
    would only pile up in memory; the workers of another process claim those tasks."""
    api_only = msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, workers=False)
    )
    async with start_service(api_only) as api:
        for n in range(20):
            response = await api.client.post(
                "/api/v1/tasks",
                json={"template": "summarize", "params": {"text": f"later {n}"}, "delay": 3600},
            )
            assert response.status_code == 201, response.text
        assert api.app.runtime.pool._due == []


@postgresql_only
@pytest.mark.parametrize("workers", [True, False], ids=["with-workers", "api-only"])
async def test_a_submit_wakes_the_other_processes_only_when_no_worker_here_takes_it(
    settings: Settings, start_service: StartService, workers: bool, db_url: str
) -> None:
    # A process whose workers have a slot free claims its own submit: waking every other
    # process too made each of them claim, and find nothing (with two processes, a third of
    # the claims were empty). An API-only process (or one whose slots are all busy) wakes them.
    one = msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, workers=workers)
    )
    other = Database(db_url)
    try:
        async with watching(other) as woken:
            await asyncio.wait_for(woken.queued.wait(), 10)  # it listens
            async with start_service(one) as svc:
                woken.clear()
                await svc.submit("summarize", text="who claims it?")
                # Then a submit that wakes for sure: notifications arrive in commit order, so the
                # first one, had it been sent, is counted once this one's have come.
                another = Database(db_url)
                try:
                    new = NewTask(template="t", template_version=1, params={})
                    sentinel = (await TaskStore(another).enqueue(new)).task.id
                finally:
                    await another.close()
                await wait_until(lambda: [sentinel] in woken.changed)
                assert woken.queued_count == 1 + (not workers)
    finally:
        await other.close()


@postgresql_only
async def test_a_transactions_notifications_go_with_its_commit_and_never_without_it(
    two: tuple[Database, Database], db_url: str
) -> None:
    # The notifications and the COMMIT travel in one round trip: the listener, once told,
    # finds the change committed; a transaction that fails after marking its notices sends
    # none; and the connection is ready for the next transaction (psycopg's own COMMIT finds
    # nothing open).
    def table(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE probe (key TEXT)"))
        conn.execute(text("CREATE TABLE once (key TEXT UNIQUE DEFERRABLE INITIALLY DEFERRED)"))

    await two[0].transaction(table)
    async with watching(two[1]) as woken:
        await asyncio.wait_for(woken.queued.wait(), 10)
        woken.clear()

        def failing(conn: Connection) -> None:
            conn.execute(text("INSERT INTO probe VALUES ('a')"))
            notices.queued(conn)
            notices.changed(conn, [41])
            raise RuntimeError("the body fails after marking its notices")

        with pytest.raises(RuntimeError, match="the body fails after marking"):
            await two[0].transaction(failing)

        # The COMMIT itself fails, inside the query that carries the notifications (a
        # deferred unique key is checked only then): nothing is told, the error reaches the
        # caller, and the body ran again as for any conflict.
        runs: list[int] = []

        def failing_at_commit(conn: Connection) -> None:
            runs.append(1)
            conn.execute(text("INSERT INTO once VALUES ('x'), ('x')"))
            notices.queued(conn)
            notices.changed(conn, [44])

        with pytest.raises(psycopg.errors.UniqueViolation):
            await two[0].transaction(failing_at_commit)
        assert len(runs) > 1

        def marking(conn: Connection) -> None:
            conn.execute(text("INSERT INTO probe VALUES ('b')"))
            notices.queued(conn)
            notices.changed(conn, [42])
            notices.changed(conn, [43], progress=True)

        for _ in range(3):  # each on a connection left ready by the one before
            await two[0].transaction(marking)
            await asyncio.wait_for(woken.queued.wait(), 5)
            await wait_until(lambda: len(woken.changed) == 2)
            assert sorted(zip(woken.changed, woken.progress, strict=True)) == [
                ([42], False),
                ([43], True),
            ]
            assert sql_rows(db_url, "SELECT key FROM probe") == [("b",)]

            def again(conn: Connection) -> None:
                conn.execute(text("DELETE FROM probe"))

            await two[0].transaction(again)
            woken.clear()


@postgresql_only
@pytest.mark.timeout(90)
async def test_the_wake_ups_come_back_with_the_first_write_after_an_outage(
    settings: Settings, start_service: StartService, postgres: PostgresServer
) -> None:
    """Down a while, the LISTEN connection's retries back off (up to 30 s apart). Once a
    write works again, the server is back: it listens again at once, not at its next retry
    (other processes' submits waited on the 1 s poll meanwhile)."""
    async with start_service(settings) as svc:
        db = svc.app.runtime.db
        await wait_until(lambda: db.listening, timeout=10)
        with structlog.testing.capture_logs() as logged:
            postgres.stop()
            try:

                def backed_off() -> bool:  # its next retry 4 s away, or more
                    return any(
                        e["event"] == "database.listen_failed" and e["retry_in_s"] >= 4
                        for e in logged
                    )

                await wait_until(backed_off, timeout=30, interval=0.05)
            finally:
                postgres.resume()
        body = {"template": "summarize", "params": {"text": "after"}}
        while (await svc.client.post("/api/v1/tasks", json=body)).status_code != 201:
            await asyncio.sleep(0.05)
        back = asyncio.get_running_loop().time()
        await wait_until(lambda: db.listening, timeout=10, interval=0.01)
        assert asyncio.get_running_loop().time() - back < 2 * load_slack()
