"""The all-tasks feed (GET /api/v1/events) and the one reader that serves every event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from orchestra.config import Settings
from orchestra.db import Database, TaskStore
from orchestra.db.feed import FeedEvent, FeedFilter
from orchestra.domain import NewTask
from orchestra.feed import START_LOOKBACK, EventFeed
from orchestra.notify import TaskSignals
from tests.conftest import Service, StartService, sql_rows
from tests.fixtures.postgres import ON_POSTGRESQL
from tests.fixtures.servers import wait_until
from tests.fixtures.sse import read_events

Event = dict[str, Any]


async def feed_until(
    svc: Service,
    enough: Callable[[list[Event]], bool],
    query: str = "after=0",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[Event]:
    """The feed's events until ``enough(seen)`` (the feed itself never ends)."""
    seen: list[Event] = []
    async with asyncio.timeout(timeout):
        stream = read_events(svc.client, f"/api/v1/events?{query}", headers)
        async with aclosing(stream) as events:
            async for event in events:
                seen.append(event)
                if enough(seen):
                    break
    return seen


def finished(n: int) -> Callable[[list[Event]], bool]:
    return lambda seen: sum(e["event"] == "task.finished" for e in seen) >= n


def stored(db_url: str, after: int = 0) -> list[tuple[int, int, int]]:
    """(id, task_id, seq) of every stored event after ``after``, in id order."""
    rows = sql_rows(
        db_url, "SELECT id, task_id, seq FROM task_events WHERE id > ? ORDER BY id", (after,)
    )
    return [(int(i), int(t), int(s)) for i, t, s in rows]


def keys(events: list[Event]) -> list[tuple[int, int, int]]:
    return [(int(e["id"]), e["task_id"], e["seq"]) for e in events]


async def test_the_feed_delivers_every_tasks_events_in_id_order(
    service: Service, db_url: str
) -> None:
    follower = asyncio.create_task(feed_until(service, finished(6)))
    tasks = await asyncio.gather(*(service.submit("summarize", text=f"t{i}") for i in range(6)))
    for task in tasks:
        await service.wait(task["id"])
    seen = await follower
    assert keys(seen) == stored(db_url)  # every event, once, in id order
    async with service.client.stream("GET", "/api/v1/events?after=0") as raw:
        lines = raw.aiter_lines()
        first = [await anext(lines) for _ in range(3)]
    assert first[0] == f"id: {seen[0]['id']}"  # the SSE id is the global id
    assert first[1] == "event: task.queued"
    for task in tasks:  # each task's own events, in its own order, as its own stream has them
        own = [e for e in seen if e["task_id"] == task["id"]]
        assert [e["seq"] for e in own] == list(range(1, len(own) + 1))
        assert {e["template"] for e in own} == {"summarize"}
        per_task = [
            e async for e in read_events(service.client, f"/api/v1/tasks/{task['id']}/events")
        ]
        assert [e["event"] for e in per_task] == [e["event"] for e in own]


async def test_the_feed_filters_by_template_and_event_type(service: Service) -> None:
    summaries = [await service.submit("summarize", text=f"s{i}") for i in range(2)]
    titles = [await service.submit("title", text=f"t{i}", max_words=3) for i in range(2)]
    for task in summaries + titles:
        await service.wait(task["id"])
    commas = await feed_until(
        service, finished(2), "after=0&template=summarize&type=task.queued,task.finished"
    )
    repeated = await feed_until(
        service, finished(2), "after=0&template=summarize&type=task.queued&type=task.finished"
    )
    assert commas == repeated
    assert sorted(e["event"] for e in commas) == ["task.finished"] * 2 + ["task.queued"] * 2
    assert {e["task_id"] for e in commas} == {t["id"] for t in summaries}
    assert {e["event"] for e in commas} == {"task.queued", "task.finished"}
    only_titles = await feed_until(service, finished(2), "after=0&template=title")
    assert {e["task_id"] for e in only_titles} == {t["id"] for t in titles}
    assert "step.started" in {e["event"] for e in only_titles}


async def test_the_feed_of_a_deleted_template_s_tasks_still_opens(
    settings: Settings, start_service: StartService
) -> None:
    """A consumer following one registered template's events: once the template was deleted
    (its tasks and events kept), it got a 404 at its next reconnect, across a restart too
    (helper-122). A name no task holds is still a 404."""
    body = "name: greet2\nsteps:\n  - {id: a, kind: render, text: hi}\n"
    async with start_service(settings) as svc:
        assert (await svc.client.post("/api/v1/templates", content=body)).status_code == 201
        await svc.wait((await svc.submit("greet2"))["id"])
        assert (await svc.client.delete("/api/v1/templates/greet2")).status_code == 204
        kept = await feed_until(svc, finished(1), "after=0&template=greet2")
        assert kept[-1]["event"] == "task.finished"
    async with start_service(settings) as svc:  # a restart: the name is known by its tasks
        assert (await feed_until(svc, finished(1), "after=0&template=greet2")) == kept
        gone = await svc.client.get("/api/v1/events", params={"template": "never"})
        assert gone.status_code == 404 and gone.json()["code"] == "template_not_found"


async def test_bad_feed_requests_are_400s_naming_the_field(service: Service) -> None:
    bad = await service.client.get("/api/v1/events", params={"type": "task.queued,task.nope"})
    assert bad.status_code == 400
    [problem] = bad.json()["fields"]
    assert problem["field"] == "type" and "task.nope" in problem["message"]
    for params, headers, field in (
        ({"after": "-1"}, {}, "after"),
        ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID"),  # as sent (it said last_event_id)
        # It said "must be an integer, not '00005'".
        ({"after": "00005"}, {}, "after"),
    ):
        answer = await service.client.get("/api/v1/events", params=params, headers=headers)
        assert answer.status_code == 400, answer.text
        assert answer.json()["fields"][0]["field"] == field, answer.text
        if field == "after" and params["after"] == "00005":
            assert "written without leading zeros (5, not 00005)" in answer.text, answer.text


async def test_last_event_id_resumes_the_feed_across_a_restart(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    async with start_service(settings) as first:
        for i in range(3):
            await first.wait((await first.submit("summarize", text=f"before {i}"))["id"])
        before = await feed_until(first, finished(3))
    resume_at = str(before[len(before) // 2]["id"])
    async with start_service(settings) as second:  # the same database, a new process's reader
        for i in range(2):
            last = (await second.submit("summarize", text=f"after {i}"))["id"]
            await second.wait(last)

        def done(seen: list[Event]) -> bool:
            return seen[-1]["event"] == "task.finished" and seen[-1]["task_id"] == last

        rest = await feed_until(second, done, "", {"Last-Event-ID": resume_at})
        by_query = await feed_until(second, done, f"after={resume_at}")
    assert keys(rest) == stored(db_url, int(resume_at))  # no gap, no repeat
    assert keys(by_query) == keys(rest)


async def test_without_a_cursor_the_feed_starts_with_the_next_event(service: Service) -> None:
    old = await service.submit("summarize", text="old")
    await service.wait(old["id"])
    follower = asyncio.create_task(feed_until(service, finished(1), ""))
    await asyncio.sleep(0)  # the request is on its way; anything it misses would fail below
    await wait_until(lambda: service.app.runtime.feed.subscribers >= 1)
    new = await service.submit("summarize", text="new")
    seen = await follower
    assert {e["task_id"] for e in seen} == {new["id"]}


async def test_a_resume_from_a_deleted_event_continues_from_the_oldest_kept(
    service: Service, db_url: str
) -> None:
    tasks = [await service.submit("summarize", text=f"t{i}") for i in range(3)]
    for task in tasks:
        await service.wait(task["id"])
    # What retention does to the oldest finished task: its events go with it.
    sql_rows(db_url, "DELETE FROM task_events WHERE task_id = ?", (tasks[0]["id"],))
    sql_rows(db_url, "DELETE FROM tasks WHERE id = ?", (tasks[0]["id"],))
    seen = await feed_until(service, finished(2), "after=1")
    assert keys(seen) == stored(db_url)
    assert {e["task_id"] for e in seen} == {tasks[1]["id"], tasks[2]["id"]}


async def test_a_resume_past_every_event_ever_recorded_is_a_400_saying_so(
    service: Service, db_url: str
) -> None:
    """An id this database never gave (a client of another database, or of one restored from
    an older copy) was taken, and the stream showed nothing until events passed it."""
    task = await service.submit("summarize", text="one")
    await service.wait(task["id"])
    [(newest,)] = sql_rows(db_url, "SELECT max(id) FROM task_events")
    for params, headers, field in (
        ({"after": str(newest + 50)}, {}, "after"),
        ({}, {"Last-Event-ID": str(newest + 50)}, "Last-Event-ID"),
    ):
        answer = await service.client.get("/api/v1/events", params=params, headers=headers)
        assert answer.status_code == 400, answer.text
        [problem] = answer.json()["fields"]
        assert problem["field"] == field, problem
        # At least the newest kept (PostgreSQL may have given ids to rolled-back inserts).
        given = re.search(r"highest event id this database ever gave \((\d+)\)", problem["message"])
        assert given is not None and newest <= int(given.group(1)) < newest + 50, problem
    # Every event deleted (retention): an id that was given still resumes, from the next one.
    sql_rows(db_url, "DELETE FROM task_events")
    later = await service.submit("summarize", text="two")
    seen = await feed_until(service, finished(1), f"after={newest}")
    assert {e["task_id"] for e in seen} == {later["id"]}
    assert min(e["id"] for e in seen) > newest


# -- the reader itself ------------------------------------------------------------------------


@asynccontextmanager
async def running_feed(db: Database, **options: Any) -> AsyncIterator[tuple[EventFeed, TaskStore]]:
    signals = TaskSignals()
    feed = EventFeed(db, signals, **options)
    await feed.start()
    reader = asyncio.create_task(feed.run())
    try:
        yield feed, TaskStore(db, on_change=signals.publish)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def enqueue(feed: EventFeed, store: TaskStore) -> int:
    """Queue a task as a submit does: the feed is told (no task signal announces it)."""
    task = (await store.enqueue(NewTask(template="t", template_version=1, params={}))).task
    feed.wake()
    return task.id


def collect(feed: EventFeed, into: list[FeedEvent], after: int = 0) -> asyncio.Task[None]:
    async def follow() -> None:
        async for batch in feed.follow(FeedFilter(), after):
            into.extend(batch)

    return asyncio.create_task(follow())


async def test_a_follower_that_falls_behind_reads_the_rest_from_the_database(
    db: Database, db_url: str
) -> None:
    async with running_feed(db, buffer=3, poll_seconds=0.05) as (feed, store):
        fast: list[FeedEvent] = []
        slow: list[FeedEvent] = []
        gate = asyncio.Event()

        async def slow_follow() -> None:
            async for batch in feed.follow(FeedFilter(), 0):
                slow.extend(batch)
                await gate.wait()  # a client that stops reading for a while

        followers = [collect(feed, fast), asyncio.create_task(slow_follow())]
        await wait_until(lambda: feed.subscribers == 2)
        for n in range(1, 21):
            await enqueue(feed, store)
            await wait_until(lambda n=n: len(fast) == n)  # one batch per event
        assert feed.overflows >= 1  # the slow one's buffer was dropped, not grown
        gate.set()
        await wait_until(lambda: len(slow) == 20)
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    every = [e[0] for e in stored(db_url)]
    assert [e.id for e in fast] == every
    assert [e.id for e in slow] == every


async def test_one_read_serves_every_follower(db: Database) -> None:
    async with running_feed(db, poll_seconds=30) as (feed, store):
        seen: list[list[FeedEvent]] = [[] for _ in range(50)]
        followers = [collect(feed, into) for into in seen]
        await wait_until(lambda: feed.subscribers == 50)
        reads = feed.reads
        await enqueue(feed, store)
        await wait_until(lambda: all(len(s) == 1 for s in seen))
        assert feed.reads - reads <= 2  # not one per follower
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


# -- PostgreSQL: ids taken at insert, committed later -------------------------------------------

postgresql_only = pytest.mark.skipif(not ON_POSTGRESQL, reason="SQLite commits ids in order")


@contextmanager
def held_open_event(db_url: str, task_id: int) -> Iterator[psycopg.Connection[Any]]:
    """A transaction that takes the next event id and stays open (as a slow writer does)."""
    from orchestra.db.postgres_engine import conninfo

    conn = psycopg.connect(conninfo(db_url))
    try:
        conn.execute("UPDATE tasks SET priority = priority WHERE id = %s", (task_id,))
        conn.execute(
            "INSERT INTO task_events (task_id, seq, time, type, data) "
            "VALUES (%s, 100, '2026-01-01T00:00:00Z', 'step.skipped', '{}')",
            (task_id,),
        )
        yield conn
    finally:
        conn.close()


@postgresql_only
async def test_an_event_committed_late_is_not_skipped(db: Database, db_url: str) -> None:
    async with running_feed(db, poll_seconds=0.05, gap_grace=600) as (feed, store):
        got: list[FeedEvent] = []
        follower = collect(feed, got)
        first = await enqueue(feed, store)
        await wait_until(lambda: len(got) == 1)
        with held_open_event(db_url, first) as held:
            await enqueue(feed, store)  # commits the id after the held one
            reads = feed.reads
            await wait_until(lambda: feed.reads >= reads + 10)
            assert [e.type for e in got] == ["task.queued"]  # held back behind the gap
            held.commit()
            await wait_until(lambda: len(got) == 3)
        follower.cancel()
    assert [e.type for e in got] == ["task.queued", "step.skipped", "task.queued"]
    assert [e.id for e in got] == sorted(e.id for e in got)


@postgresql_only
async def test_an_id_rolled_back_holds_the_feed_for_one_read_not_the_grace(
    db: Database, db_url: str
) -> None:
    async with running_feed(db, poll_seconds=0.05, gap_grace=600) as (feed, store):
        got: list[FeedEvent] = []
        follower = collect(feed, got)
        first = await enqueue(feed, store)
        with held_open_event(db_url, first) as held:
            second = await enqueue(feed, store)
            held.rollback()
            await wait_until(lambda: len(got) == 2)  # long before the 600 s grace
        follower.cancel()
    assert [e.task_id for e in got] == [first, second]


@postgresql_only
async def test_a_gap_held_past_the_grace_is_given_up(db: Database, db_url: str) -> None:
    now = [0.0]
    async with running_feed(db, poll_seconds=0.05, gap_grace=5, clock=lambda: now[0]) as (
        feed,
        store,
    ):
        got: list[FeedEvent] = []
        follower = collect(feed, got)
        first = await enqueue(feed, store)
        with held_open_event(db_url, first) as held:
            second = await enqueue(feed, store)
            reads = feed.reads
            await wait_until(lambda: feed.reads >= reads + 3)
            assert len(got) == 1
            now[0] = 6.0  # past the grace
            await wait_until(lambda: len(got) == 2)
            held.commit()
        follower.cancel()
    assert [e.task_id for e in got] == [first, second]


async def test_followers_that_hang_up_leave_the_hub(service: Service) -> None:
    """A client that closes an idle stream (the all-tasks feed, or a queued task's) is noticed
    while nothing happens: its subscription goes, nothing is left behind."""
    feed = service.app.runtime.feed
    queued = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "x"}, "delay": 3600}
    )
    assert queued.status_code == 201, queued.text
    paths = ["/api/v1/events", f"/api/v1/tasks/{queued.json()['id']}/events"]
    async with httpx.AsyncClient(base_url=str(service.client.base_url)) as own:
        streams = [await own.send(own.build_request("GET", p), stream=True) for p in paths]
        assert [s.status_code for s in streams] == [200, 200]
        await wait_until(lambda: feed.subscribers == 2)
        for stream in streams:
            await stream.aclose()  # the connection goes with it (a streamed body not read)
    await wait_until(lambda: feed.subscribers == 0)


# -- the reader writes for followers that are caught up ----------------------------------------


def follow_with(
    feed: EventFeed, yielded: list[FeedEvent], write: Callable[[list[FeedEvent]], bool]
) -> asyncio.Task[None]:
    async def follow() -> None:
        async for batch in feed.follow(FeedFilter(), 0, write):
            yielded.extend(batch)

    return asyncio.create_task(follow())


async def test_a_caught_up_follower_gets_new_events_from_the_reader_without_waking(
    db: Database, db_url: str
) -> None:
    async with running_feed(db, poll_seconds=30) as (feed, store):
        written: list[list[FeedEvent]] = []
        yielded: list[FeedEvent] = []

        def write(events: list[FeedEvent]) -> bool:
            written.append(events)
            return True

        follower = follow_with(feed, yielded, write)
        await enqueue(feed, store)  # caught up from the database, or written: either way
        await wait_until(lambda: len(yielded) + sum(map(len, written)) == 1)
        before = (len(yielded), feed.delivered)
        for n in range(2, 6):
            await wait_until(lambda: feed.waiting == 1)
            await enqueue(feed, store)
            await wait_until(lambda n=n: len(yielded) + sum(map(len, written)) == n)
        assert len(yielded) == before[0]  # its task yielded nothing more: it was never woken
        assert feed.delivered - before[1] == 4
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    every = [e[0] for e in stored(db_url)]
    assert sorted(e.id for e in yielded + [e for w in written for e in w]) == every
    assert [e.id for w in written for e in w] == every[len(every) - sum(map(len, written)) :]


async def test_events_a_writer_cannot_take_come_from_the_follow_in_order(
    db: Database, db_url: str
) -> None:
    async with running_feed(db, poll_seconds=30) as (feed, store):
        written: list[FeedEvent] = []
        yielded: list[FeedEvent] = []
        refuse = True

        def write(events: list[FeedEvent]) -> bool:
            if refuse:
                return False  # e.g. an earlier write still waits for the client
            written.extend(events)
            return True

        follower = follow_with(feed, yielded, write)
        for n in range(1, 4):
            await wait_until(lambda: feed.waiting == 1)
            await enqueue(feed, store)
            await wait_until(lambda n=n: len(yielded) == n)
        refuse = False
        await wait_until(lambda: feed.waiting == 1)
        await enqueue(feed, store)
        await wait_until(lambda: len(written) == 1)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    assert feed.delivered == 1
    assert [e.id for e in yielded + written] == [e[0] for e in stored(db_url)]


async def test_idle_followers_are_written_by_the_reader_over_http(
    service: Service, db_url: str
) -> None:
    """Idle streams (the all-tasks feed, a queued task's) get the next event from the reader
    itself, exactly as their own task would send it; a task's stream still ends after
    ``task.finished``."""
    feed = service.app.runtime.feed
    queued = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "x"}, "delay": 3600}
    )
    assert queued.status_code == 201, queued.text
    task_id = queued.json()["id"]
    start = stored(db_url)[-1][0]

    async def everything() -> list[Event]:
        return await feed_until(service, finished(1), f"after={start}")

    async def own() -> list[Event]:
        return [e async for e in read_events(service.client, f"/api/v1/tasks/{task_id}/events")]

    streams = [asyncio.create_task(f()) for f in [everything] * 4 + [own] * 4]
    await wait_until(lambda: feed.subscribers == 8 and feed.waiting == 8)
    delivered = feed.delivered
    cancelled = await service.client.post(f"/api/v1/tasks/{task_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    async with asyncio.timeout(20):
        seen = await asyncio.gather(*streams)
    assert feed.delivered - delivered >= 8  # each stream's new events, written by the reader
    ids = [e[0] for e in stored(db_url) if e[1] == task_id]
    seqs = [e[2] for e in stored(db_url) if e[1] == task_id]
    for events in seen[:4]:
        assert [int(e["id"]) for e in events] == [i for i in ids if i > start]
        assert events[-1]["event"] == "task.finished" and events[-1]["status"] == "cancelled"
    for events in seen[4:]:  # every event of the task, then the stream ended
        assert [e["seq"] for e in events] == seqs
        assert events[-1]["event"] == "task.finished"
    await wait_until(lambda: feed.subscribers == 0)


async def test_with_nobody_following_the_reader_reads_no_events(db: Database, db_url: str) -> None:
    """Nobody subscribed: the watermark moves to the newest event (on PostgreSQL a starting
    reader's look back before it) without reading the events since (a busy queue's second of
    events, decoded on the event loop, held it 10 ms and more); a follower that comes later
    still gets every event after it subscribed."""
    signals = TaskSignals()
    feed = EventFeed(db, signals)
    await feed.start()
    store = TaskStore(db, on_change=signals.publish)
    for _ in range(5):
        await store.enqueue(NewTask(template="t", template_version=1, params={}))
    await feed.read_once()
    assert feed.reads == 0
    newest = sql_rows(db_url, "SELECT max(id) FROM task_events")[0][0]
    lookback = START_LOOKBACK if db_url.startswith("postgresql") else 0
    assert feed.watermark == max(0, newest - lookback)
    with feed.subscribe(FeedFilter()) as sub:
        later = (await store.enqueue(NewTask(template="t", template_version=1, params={}))).task
        await feed.read_once()
        assert feed.reads == 1
        assert later.id in [e.task_id for e in sub.take()]


# -- clients that read slower than events come -------------------------------------------------


async def slow_reader(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An event stream on a connection with a 4 KB receive buffer, whose client reads
    nothing until asked (its server's writes soon have to wait)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode()))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def ids_read(reader: asyncio.StreamReader, last: int) -> list[int]:
    """The ids of the events read until ``last``'s (10 s: a stalled stream ends the read)."""
    seen: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):  # sooner than a heartbeat (15 s) would wake a stall
            while not seen or seen[-1] < last:
                line = await reader.readline()
                if line.startswith(b"id: "):
                    seen.append(int(line[4:]))
    return seen


@pytest.mark.parametrize("count", [300, 1500])
@pytest.mark.parametrize("stream", ["feed", "task"])
async def test_followers_that_read_slowly_get_every_event_in_order(
    service: Service, db_url: str, count: int, stream: str
) -> None:
    """Four clients of the all-tasks feed (or of the task's own stream) stop reading while
    events of 12 KB come in a hundred commits: the service's writes to them wait, then their
    buffers overflow (1,500: past the 1,000 a subscription holds). Once they read, each gets
    every event in order, at once."""
    feed = service.app.runtime.feed
    queued = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "x"}, "delay": 3600}
    )
    assert queued.status_code == 201, queued.text
    task_id, start = queued.json()["id"], stored(db_url)[-1][0]
    path = (
        f"/api/v1/events?after={start}" if stream == "feed" else f"/api/v1/tasks/{task_id}/events"
    )
    conns = [await slow_reader(service.url, path) for _ in range(4)]
    await wait_until(lambda: feed.subscribers == 4 and feed.waiting == 4)
    overflows, per, pad = feed.overflows, count // 100, json.dumps({"pad": "x" * 12000})
    for k in range(100):
        sql_rows(
            db_url,
            "INSERT INTO task_events (task_id, seq, time, type, data) "
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "SELECT ?, i + ?, '2026-12-06T00:00:00Z', 'step.skipped', ? FROM n",
            (per, task_id, 1 + k * per, pad),
        )
        feed.wake()
        newest = stored(db_url, start)[-1][0]
        await wait_until(lambda n=newest: feed.watermark >= n)  # handed out, not read
    if stream == "feed":
        every = [e[0] for e in stored(db_url, start)]
    else:  # its stream numbers the task's events from its first (task.queued)
        every = [e[2] for e in stored(db_url) if e[1] == task_id]
    got = await asyncio.gather(*(ids_read(reader, every[-1]) for reader, _ in conns))
    for _, writer in conns:
        writer.close()
    for ids in got:
        assert ids == every, (len(ids), len(every))
    if count > feed.buffer:
        assert feed.overflows - overflows >= 4
