"""The dashboard's task pages over real HTTP (no browser): a task page's live stream, bad query
values, the bulk confirmation's ceiling, searching without live refresh, and the streamed text
a task page starts from."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import unescape

import httpx
import pytest

from orchestra.config import Settings
from orchestra.db import Database, Lease, TaskStore
from orchestra.domain import NewTask
from orchestra.feed import EventFeed
from orchestra.web import notices, task_pages
from tests.conftest import Service, StartService, make_keys, sql_rows, with_workers
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until

SAME_SITE = {"sec-fetch-site": "same-origin"}
TOO_BIG = "99999999999999999999999"
#: A superscript two: ``str.isdigit()`` says yes, ``int()`` says no.
SUPERSCRIPT = "\u00b2"


def _last_seq(db_url: str, task_id: int) -> int:
    [(last,)] = sql_rows(db_url, "SELECT max(seq) FROM task_events WHERE task_id = ?", (task_id,))
    return int(last)


async def _sse(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[dict[str, str], bytes]]:
    """Each message of a text/event-stream as its fields and its raw bytes (comments too)."""
    async with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200, await response.aread()
        buffer = b""
        async for chunk in response.aiter_bytes():
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                raw, buffer = buffer.split(b"\r\n\r\n", 1)
                fields: dict[str, str] = {}
                for line in raw.decode().split("\r\n"):
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                yield fields, raw + b"\r\n\r\n"


def _hidden(html: str) -> dict[str, str]:
    """The hidden fields of a page's forms."""
    pairs = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html)
    return {name: unescape(value) for name, value in pairs}


@asynccontextmanager
async def _login(svc: Service, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=svc.url, timeout=30, headers=SAME_SITE) as client:
        answer = await client.post("/ui/login", data={"key": token, "next": "/ui/tasks"})
        assert answer.status_code == 303, answer.text
        yield client


@pytest.fixture
async def held(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama
) -> AsyncIterator[Service]:
    """One worker slot and a model that does not answer while the test runs."""
    fake_ollama.latency = 60
    one = with_workers(settings, concurrency=1)
    async with start_service(one) as svc:
        yield svc


# -- a task page's live stream ----------------------------------------------------------------


async def test_a_live_stream_opened_after_the_task_finished_still_sends_a_refresh(
    service: Service, db_url: str
) -> None:
    """The page read its task running, the task finished, then the stream opened after the
    last event: it must still tell the page to fetch itself again."""
    task = await service.submit("summarize", text="done already")
    await service.wait(task["id"])
    after = _last_seq(db_url, task["id"])
    url = f"/ui/tasks/{task['id']}/live?after={after}"
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, url):
            if fields.get("event") == "refresh":
                break
        else:
            pytest.fail("the stream ended without a refresh")


async def test_a_live_stream_resumed_after_the_end_refreshes_once_then_only_comments(
    settings: Settings, start_service: StartService, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the end, the stream's keep-alives ride on the event feed's one shared heartbeat
    (no timer of its own per follower, and no subscription)."""
    defaults = EventFeed.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "heartbeat", 0.05)
    async with start_service(settings) as svc:
        feed = svc.app.runtime.feed
        assert feed.heartbeat == 0.05
        task = await svc.submit("summarize", text="done already")
        await svc.wait(task["id"])
        url = f"/ui/tasks/{task['id']}/live"
        last = str(_last_seq(db_url, task["id"]))
        seen: list[tuple[dict[str, str], bytes]] = []
        followers: list[int] = []
        async with asyncio.timeout(10):
            async for message in _sse(svc.client, url, {"last-event-id": last}):
                seen.append(message)
                followers.append(feed.subscribers)
                if len(seen) == 4:
                    break
        assert seen[0][0].get("event") == "refresh"
        # Keep-alives are comments alone: a `data:` line would dispatch an empty message event.
        assert [raw for _, raw in seen[1:]] == [b": keep-alive\r\n\r\n"] * 3
        # Not a subscription: a finished task's open page never makes the reader read.
        assert all(n == 0 for n in followers[1:]), followers


async def test_a_live_stream_sends_one_cache_control_header(service: Service) -> None:
    task = await service.submit("summarize", text="x")
    await service.wait(task["id"])
    async with service.client.stream("GET", f"/ui/tasks/{task['id']}/live") as answer:
        assert answer.headers.get_list("cache-control") == ["no-store"]
    async with service.client.stream("GET", "/ui/live") as answer:
        assert answer.headers.get_list("cache-control") == ["no-store"]


async def test_the_live_signal_sends_keep_alives_as_comments_alone(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestra.web import overview

    monkeypatch.setattr(overview, "LOOK_EVERY", 0.05)
    async with asyncio.timeout(10):
        async for _, raw in _sse(service.client, "/ui/live"):
            assert raw == b": keep-alive\r\n\r\n"
            break
        else:
            pytest.fail("the stream ended without a keep-alive")


async def test_the_live_signal_of_an_idle_service_sends_no_change(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle workers' claims (every ``poll_interval``) and the reaper's rounds changed no task,
    yet they woke every live page: each overview and tasks page fetched itself again every
    second, clearing any text selected on it."""
    from orchestra.web import overview

    monkeypatch.setattr(overview, "LOOK_EVERY", 0.25)
    seen: list[dict[str, str]] = []
    async with asyncio.timeout(20):
        async for fields, _ in _sse(service.client, "/ui/live"):
            seen.append(fields)
            if len(seen) == 8:  # 2 s: four claim polls of the idle workers
                break
        else:
            pytest.fail(f"the stream ended after {len(seen)} messages: {seen}")
    assert [f for f in seen if "event" in f] == []
    # A real change still is one.
    async with asyncio.timeout(20):
        async for fields, _ in _sse(service.client, "/ui/live"):
            if "event" in fields:
                assert fields["event"] == "changed"
                break
            await service.submit("summarize", text="a change")
        else:
            pytest.fail("the stream ended without telling of the change")


@pytest.mark.parametrize("page", ["/ui/", "/ui/tasks"])
async def test_a_change_between_a_page_and_its_live_stream_is_sent_at_once(
    service: Service, monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    """A task that finished after the page was made and before its live stream connected
    was never shown: the stream counted from its own start, and saw no change (a red
    fresh-clone run: the overview through a proxy stayed at 0 succeeded). The page names the
    counts it shows (``seen``), and a stream that finds others says ``changed`` at once."""
    from orchestra.web import overview

    monkeypatch.setattr(overview, "LOOK_EVERY", 30.0)  # no look of its own within the test
    html = (await service.client.get(page)).text
    [url] = re.findall(r'sse-connect="(/ui/live[^"]*)"', html)
    url = url.replace("&amp;", "&")
    assert "seen=" in url, url
    await service.wait((await service.submit("summarize", text="meanwhile"))["id"])
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, url):
            assert fields.get("event") == "changed", fields
            break
        else:
            pytest.fail("the stream ended without telling of the change")
    # Connected with the counts it shows: nothing to say until they change.
    html = (await service.client.get(page)).text
    [url] = re.findall(r'sse-connect="(/ui/live[^"]*)"', html)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            async for fields, _ in _sse(service.client, url.replace("&amp;", "&")):
                raise AssertionError(f"told of a change that is not one: {fields}")


async def test_a_live_stream_resumed_from_its_last_event_is_told_only_of_later_changes(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``changed`` event's id is the counts it tells of: a stream reconnected with it
    (Last-Event-ID, or ``seen`` from a hidden tab seen again) says nothing until they change,
    where it said ``changed`` at every reconnection after any change since the page loaded."""
    from orchestra.web import overview

    monkeypatch.setattr(overview, "LOOK_EVERY", 30.0)
    await service.wait((await service.submit("summarize", text="before"))["id"])
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, "/ui/live?seen=old"):
            assert fields.get("event") == "changed", fields
            told = fields["id"]
            break
        else:
            pytest.fail("the stream ended without telling of the change")
    assert "succeeded-1" in told, told
    for headers, url in (
        ({"Last-Event-ID": told}, "/ui/live?seen=old"),
        ({}, f"/ui/live?seen={told}"),
    ):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                async for fields, _ in _sse(service.client, url, headers):
                    raise AssertionError(f"told of a change that is not one: {fields}")
    await service.wait((await service.submit("summarize", text="after"))["id"])
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, "/ui/live", {"Last-Event-ID": told}):
            assert fields.get("event") == "changed" and "succeeded-2" in fields["id"], fields
            break
        else:
            pytest.fail("the stream ended without telling of the later change")


async def test_a_change_that_leaves_the_counts_as_they_were_is_told_to_a_resumed_stream(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hidden tab seen again resumes its stream from the last event it was told of. The
    event's id was the counts alone, so a change that left them as they were (a failed task
    retried that failed again) was never told, and the page stayed stale (a review: a tab in
    view refreshed on it, a tab seen again did not)."""
    from orchestra.web import overview

    monkeypatch.setattr(overview, "LOOK_EVERY", 30.0)
    submitted = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"text": "x"}, "model": "ollama/nosuch"},
    )
    assert submitted.status_code == 201, submitted.text
    failing = submitted.json()["id"]
    assert (await service.wait(failing))["status"] == "failed"
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, "/ui/live?seen=old"):
            told = fields["id"]
            break
        else:
            pytest.fail("the stream ended without an event")
    retried = await service.client.post(f"/api/v1/tasks/{failing}/retry")
    assert retried.status_code == 200, retried.text
    await wait_until(lambda: _attempts_failed(service, failing, 2), timeout=15)
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, f"/ui/live?seen={told}"):
            assert fields.get("event") == "changed", fields
            assert fields["id"] != told
            break
        else:
            pytest.fail("the resumed stream ended without telling of the change")


async def _attempts_failed(service: Service, task_id: int, attempts: int) -> bool:
    task = (await service.client.get(f"/api/v1/tasks/{task_id}")).json()
    return bool(task["status"] == "failed" and len(task["attempts"]) >= attempts)


async def test_the_streamed_text_starts_at_the_running_steps_last_start(db: Database) -> None:
    store = TaskStore(db)
    task_id = (await store.enqueue(NewTask(template="t", template_version=1, params={}))).task.id
    [first] = await store.claim("w", 1, 30)
    lease = Lease(task_id, "w", first.attempts)
    await store.start_step(lease, "a", 0)
    await store.add_text(lease, "a", "first try, ")
    await store.release(lease)
    [second] = await store.claim("w", 1, 30)  # the step starts again: its text starts over
    lease = Lease(task_id, "w", second.attempts)
    await store.start_step(lease, "a", 0)
    await store.add_text(lease, "a", "Hello")
    await store.add_text(lease, "a", ", world")
    upto = await store.last_event_seq(task_id)
    await store.add_text(lease, "a", " (later)")  # after the page's read: the stream sends it
    assert await store.step_text(task_id, "a", second.attempts, upto) == "Hello, world"
    assert await store.step_text(task_id, "b", second.attempts, upto) == ""
    # The attempt's step "a" had not started by event ``upto``: nothing yet (not the first
    # attempt's text).
    before = upto - 3
    assert await store.step_text(task_id, "a", second.attempts, before) == ""
    assert await store.last_event_seq(task_id) == upto + 1
    assert await store.last_event_seq(task_id + 1) == 0


# -- bad query values -------------------------------------------------------------------------


async def test_bad_numbers_and_times_in_a_query_are_400s_naming_the_field(
    service: Service,
) -> None:
    task = await service.submit("summarize", text="x")
    await service.wait(task["id"])
    bad = [
        ("/ui/tasks", {"cursor": SUPERSCRIPT}, "cursor"),
        ("/ui/tasks", {"cursor": TOO_BIG}, "cursor"),
        ("/ui/tasks", {"cursor": "0"}, "cursor"),
        ("/ui/tasks/rows", {"cursor": TOO_BIG}, "cursor"),
        ("/ui/tasks", {"from": "0001-01-01T00:00+01:00"}, "from"),
        ("/ui/tasks", {"to": "9999-12-31T23:59-01:00"}, "to"),
        ("/ui/tasks/confirm", {"action": "cancel", "from": "0001-01-01T00:00+01:00"}, "from"),
        (f"/ui/tasks/{task['id']}/live", {"after": TOO_BIG}, "after"),
        (f"/ui/tasks/{task['id']}/live", {"after": SUPERSCRIPT}, "after"),
    ]
    for path, params, field in bad:
        answer = await service.client.get(path, params=params)
        assert answer.status_code == 400, (path, params, answer.status_code)
        assert f"{field}: " in answer.text, (path, params, answer.text[-600:])
    resumed = await service.client.get(
        f"/ui/tasks/{task['id']}/live", headers={"last-event-id": TOO_BIG}
    )
    assert resumed.status_code == 400 and "Last-Event-ID: " in resumed.text
    posted = await service.client.post(
        "/ui/tasks/bulk", data={"action": "cancel", "id": SUPERSCRIPT}, headers=SAME_SITE
    )
    assert posted.status_code == 400 and "id: " in posted.text
    posted = await service.client.post(
        "/ui/tasks/bulk",
        data={"action": "cancel", "scope": "matching", "upto": TOO_BIG},
        headers=SAME_SITE,
    )
    assert posted.status_code == 400 and "upto: " in posted.text


async def test_a_notice_with_a_count_that_is_no_number_is_left_out(service: Service) -> None:
    cookie = notices.NOTICE_COOKIE
    for n in ("x", "-1", TOO_BIG + TOO_BIG):
        answer = await service.client.get("/ui/tasks", headers={"cookie": f"{cookie}=cancel.{n}"})
        assert answer.status_code == 200
        assert 'class="notice"' not in answer.text
    answer = await service.client.get("/ui/tasks", headers={"cookie": f"{cookie}=cancel.2"})
    assert "Cancelled: 2 tasks." in answer.text


# -- the bulk confirmation --------------------------------------------------------------------


async def test_a_task_submitted_after_the_confirmation_is_left_alone(
    held: Service, fake_ollama: FakeOllama
) -> None:
    svc = held
    mine = [await svc.submit("summarize", text=f"bulk {i}") for i in range(3)]
    await wait_until(lambda: fake_ollama.in_flight == 1)
    confirm = await svc.client.get(
        "/ui/tasks/confirm", params={"action": "cancel", "template": "summarize", "since": "1h"}
    )
    assert "Cancel 3 tasks?" in confirm.text
    fields = _hidden(confirm.text)
    assert fields["upto"] == str(mine[-1]["id"])
    assert "since" not in fields and fields["from"]  # an absolute time, fixed at confirmation
    late = await svc.submit("summarize", text="submitted after the confirmation")
    done = await svc.client.post(
        "/ui/tasks/bulk", data={**fields, "action": "cancel"}, headers=SAME_SITE
    )
    assert done.status_code == 303
    said = (await svc.client.get(done.headers["location"])).text
    # The one holding the slot is asked to stop; the two queued are cancelled at once.
    assert "Cancelled: 2 tasks; 1 running asked to stop (one may still finish first)." in said
    for task in mine:
        assert (await svc.wait(task["id"]))["status"] == "cancelled"
    # Untouched: it runs once the slot the cancelled tasks held is free.
    late_now = (await svc.client.get(f"/api/v1/tasks/{late['id']}")).json()
    assert late_now["status"] in ("queued", "running")
    await svc.client.post(f"/api/v1/tasks/{late['id']}/cancel")


async def test_the_confirmation_shows_its_button_only_to_callers_who_may_submit(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    keys = await make_keys(db_url, "read", "submit")
    async with start_service(settings) as svc:
        for scope, shown in (("read", False), ("submit", True)):
            async with _login(svc, keys[scope]) as client:
                page = await client.get("/ui/tasks/confirm", params={"action": "cancel"})
                assert page.status_code == 200
                assert ('name="action"' in page.text) is shown, scope


# -- searching --------------------------------------------------------------------------------


async def test_a_search_is_not_refreshed_live_and_the_page_says_so(service: Service) -> None:
    plain = (await service.client.get("/ui/tasks")).text
    assert "sse-connect" in plain and "live updates are off while searching" not in plain.lower()
    searched = (await service.client.get("/ui/tasks", params={"q": "needle"})).text
    assert "sse-connect" not in searched
    assert "live updates are off while searching" in searched.lower()


async def test_the_tasks_table_pages_by_keyset_through_its_older_link(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each "Older tasks" link carries the last id shown (a cursor, never an offset); following
    them visits every task once, newest first, and the last page has no such link."""
    monkeypatch.setattr(task_pages, "PAGE_SIZE", 2)
    ids = [(await service.submit("summarize", text=f"page {i}"))["id"] for i in range(5)]
    seen: list[int] = []
    url: str | None = "/ui/tasks?template=summarize"
    pages = 0
    while url is not None:
        html = (await service.client.get(url)).text
        shown = [int(i) for i in re.findall(r'<a href="/ui/tasks/(\d+)"[^>]*>#', html)]
        assert 1 <= len(shown) <= 2, shown
        seen += shown
        older = re.search(r'<a href="([^"]+)" rel="next"[^>]*>', html)
        url = unescape(older.group(1)) if older else None
        if url is not None:
            assert f"cursor={shown[-1]}" in url and "template=summarize" in url
            assert "offset" not in url
        pages += 1
    assert seen == sorted(ids, reverse=True) and pages == 3


async def test_direction_controls_in_streamed_text_are_sent_escaped(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """The live text is a value like any other: its direction controls reach the page as
    escapes, not as characters that reorder what is around them."""
    fake_ollama.reply = lambda _body: "say \u202edesrever\u202c and \u2067isolated\u2069"
    task = await service.submit("summarize", text="anything")
    await service.wait(task["id"])
    streamed = ""
    async with asyncio.timeout(10):
        async for fields, _ in _sse(service.client, f"/ui/tasks/{task['id']}/live?after=0"):
            if fields.get("event") == "tokens":
                streamed += unescape(fields["data"])
            elif fields.get("data") == "finished":
                break
    assert "\\u202edesrever\\u202c" in streamed and "\\u2067isolated\\u2069" in streamed
    assert not re.search("[\u202a-\u202e\u2066-\u2069]", streamed)
