"""The dashboard's schedules, webhooks and batches pages over real HTTP (no browser; the
browser test is at the end): each schedule's next and latest tick, pausing and resuming (and a
resume its template no longer allows), each subscription's deliveries, sending one again,
pausing a subscription, each batch's progress and first failed rows, its results, cancelling
and retrying it, and who may see which."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from html import unescape
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy.dialects import sqlite

from orchestra.config import Settings
from orchestra.db import Database
from orchestra.db import webhooks as db_webhooks
from orchestra.db.schedules import latest_fires_query
from orchestra.web import batch_pages, webhook_pages
from tests.conftest import Service, StartService, make_keys
from tests.fixtures.browser import new_page
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.fixtures.webhook_receiver import Receiver
from tests.integration.test_batches import batch_settings as batch_settings
from tests.integration.test_batches import finished, upload
from tests.integration.test_batches import svc as svc
from tests.integration.test_schedules import (
    START,
    clock_of,
    create,
    fire_due,
    no_workers,
    schedule_of_a_gone_template,
)
from tests.integration.test_schedules import idle as idle  # (a fixture)
from tests.integration.test_webhooks import loopback_service as loopback_service  # (fixtures)
from tests.integration.test_webhooks import receiver as receiver
from tests.integration.test_webhooks import subscribe

if TYPE_CHECKING:
    from playwright.async_api import Browser

SAME_SITE = {"sec-fetch-site": "same-origin"}


def text_of(html: str) -> str:
    """A page's text, tags dropped and whitespace folded (for assertions on what it says)."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def row_of(html: str, attribute: str, value: object) -> str:
    """The text of the table row marked ``data-<attribute>="<value>"``."""
    found = re.search(rf'<tr data-{attribute}="{value}">(.*?)</tr>', html, re.S)
    assert found is not None, f"no row {attribute}={value}"
    return text_of(found.group(1))


# -- schedules -------------------------------------------------------------------------------


async def test_the_schedules_page_shows_each_ones_timing_and_its_latest_tick(
    idle: Service,
) -> None:
    empty = await idle.client.get("/ui/schedules")
    assert empty.status_code == 200 and 'id="no-schedules"' in empty.text
    digest = await create(idle, every="1m")
    await create(idle, name="morning", cron="0 9 * * 1-5", timezone="Europe/Paris")
    clock_of(idle).advance(60)
    await fire_due(idle)  # digest's first tick makes a task (no workers: it stays queued)
    first = (await idle.client.get("/api/v1/schedules/digest")).json()["last_tasks"][0]
    clock_of(idle).advance(60)
    await fire_due(idle)  # the second is skipped: the first task is unfinished

    page = (await idle.client.get("/ui/schedules")).text
    row = row_of(page, "schedule", "digest")
    assert "every 1m" in row and "skipped" in row, row  # the latest tick, not the first
    assert f"task #{first['task_id']}" not in row, row
    morning = row_of(page, "schedule", "morning")
    assert "cron 0 9 * * 1-5 (Europe/Paris)" in morning and "none yet" in morning, morning
    assert f'href="/ui/schedules/{digest["id"]}"' in page

    # The first tick, with its task, is on the schedule's own page.
    own = await idle.client.get(f"/ui/schedules/{digest['id']}")
    assert own.status_code == 200
    fires = re.search(r'<table class="striped" id="fires">(.*?)</table>', own.text, re.S)
    assert fires is not None
    assert f'href="/ui/tasks/{first["task_id"]}"' in fires.group(1)
    said = text_of(fires.group(1))
    skipped = f"task {first['task_id']}, of an earlier tick, is still queued"
    assert "submitted" in said and skipped in said, said
    upcoming = re.search(r'<ol id="next-ticks">(.*?)</ol>', own.text, re.S)
    assert upcoming is not None and upcoming.group(1).count("<li>") == 5
    # Live: the body alone, fetched again every 10 s.
    assert f'hx-get="/ui/schedules/{digest["id"]}/body" hx-trigger="every 10s"' in own.text
    body = await idle.client.get(f"/ui/schedules/{digest['id']}/body")
    assert body.status_code == 200 and "<html" not in body.text and 'id="fires"' in body.text
    # By name too, as the API names it.
    assert (await idle.client.get("/ui/schedules/morning")).status_code == 200
    missing = await idle.client.get("/ui/schedules/nope")
    assert missing.status_code == 404 and "no schedule 'nope'" in text_of(missing.text)


async def test_a_schedule_is_paused_and_resumed_from_its_page(idle: Service) -> None:
    made = await create(idle, every="1m")
    page = f"/ui/schedules/{made['id']}"
    paused = await idle.client.post(f"{page}/pause", headers=SAME_SITE)
    assert paused.status_code == 303 and paused.headers["location"] == page
    api = (await idle.client.get("/api/v1/schedules/digest")).json()
    assert api["enabled"] is False and api["next_fire_at"] is None
    shown = (await idle.client.get(page)).text
    assert 'id="schedule-switch">Resume<' in shown and ">Pause<" not in shown
    assert "none while paused" in text_of(shown)
    assert "paused" in row_of((await idle.client.get("/ui/schedules")).text, "schedule", "digest")

    clock_of(idle).advance(3600)
    resumed = await idle.client.post(f"{page}/resume", headers=SAME_SITE)
    assert resumed.status_code == 303
    api = (await idle.client.get("/api/v1/schedules/digest")).json()
    assert api["enabled"] is True and api["next_fire_at"] is not None
    # Its next tick is counted from now, not from when it was paused.
    assert api["next_fire_at"] > (START.replace(hour=13)).isoformat().replace("+00:00", "")
    # A reload of the form's address (GET) goes back to the page.
    again = await idle.client.get(f"{page}/pause")
    assert again.status_code == 303 and again.headers["location"] == page


async def test_a_resume_the_template_no_longer_allows_is_said_on_the_page(idle: Service) -> None:
    made = await schedule_of_a_gone_template(idle)
    page = f"/ui/schedules/{made['id']}"
    assert (await idle.client.post(f"{page}/pause", headers=SAME_SITE)).status_code == 303
    refused = await idle.client.post(f"{page}/resume", headers=SAME_SITE)
    assert refused.status_code == 422
    said = text_of(refused.text)
    assert "Not resumed:" in said and "temporary" in said, said
    assert 'id="schedule-switch">Resume<' in refused.text  # still paused, and says so
    assert (await idle.client.get("/api/v1/schedules/digest")).json()["enabled"] is False
    not_run = await idle.client.post(f"{page}/run", headers=SAME_SITE)
    assert not_run.status_code == 422
    assert "Not run:" in text_of(not_run.text) and "temporary" in text_of(not_run.text)


async def test_run_now_from_a_schedules_page_shows_the_task_it_made(idle: Service) -> None:
    made = await create(idle, every="1h")
    ran = await idle.client.post(f"/ui/schedules/{made['id']}/run", headers=SAME_SITE)
    assert ran.status_code == 303
    task_id = int(ran.headers["location"].rsplit("/", 1)[1])
    task = (await idle.client.get(f"/api/v1/tasks/{task_id}")).json()
    assert task["template"] == "summarize" and task["params"]["text"] == "the news"
    again = await idle.client.get(f"/ui/schedules/{made['id']}/run")
    assert again.status_code == 303 and again.headers["location"] == f"/ui/schedules/{made['id']}"


async def test_each_schedules_latest_tick_is_found_by_index_not_by_a_scan(
    db: Database, db_url: str
) -> None:
    """The list's read of the latest ticks takes one index step per schedule: flattened into
    its join, SQLite scanned every tick kept."""
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's plan (PostgreSQL never flattens a MATERIALIZED step)")
    sql = str(
        latest_fires_query().compile(
            dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
        plan = " | ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
    assert "SCAN schedule_fires" not in plan and "SCAN each_fire" not in plan, plan
    assert "SEARCH each_fire USING COVERING INDEX" in plan, plan


# -- webhooks --------------------------------------------------------------------------------


async def test_the_subscriptions_list_comes_in_pages(
    loopback_service: Service, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It listed every subscription on one page (the API's list was paged, the page not)."""
    monkeypatch.setattr(webhook_pages, "LIST_SIZE", 2)
    hooks = [await subscribe(loopback_service, receiver, path=f"/h{n}") for n in range(3)]
    first = (await loopback_service.client.get("/ui/webhooks")).text
    assert re.findall(r'<tr data-webhook="(\d+)">', first) == [str(h) for h in hooks[:2]]
    [following] = re.findall(r'<a href="([^"]+)" id="later">', first)
    assert "first-hooks" not in first
    rest = (await loopback_service.client.get(unescape(following))).text
    assert re.findall(r'<tr data-webhook="(\d+)">', rest) == [str(hooks[2])]
    assert 'id="later"' not in rest and 'id="first-hooks"' in rest


async def test_a_subscriptions_deliveries_are_listed_sent_again_and_paused(
    loopback_service: Service, receiver: Receiver
) -> None:
    hooked = loopback_service  # (the fixture's name, shorter)
    hook_id = await subscribe(hooked, receiver, event_types=["task.finished"])
    listed = await hooked.client.get("/ui/webhooks")
    assert "none yet" in row_of(listed.text, "webhook", hook_id)
    receiver.status = 500  # the first tries fail, then it answers
    task = await hooked.submit("summarize", text="hooked")
    await hooked.wait(task["id"])
    await wait_until(lambda: len(receiver.paths) >= 2, timeout=30)
    receiver.status = 200
    await wait_until(lambda: len(receiver.received) >= 1, timeout=30)

    async def delivered() -> bool:
        page = (await hooked.client.get(f"/ui/webhooks/{hook_id}")).text
        return "delivered" in text_of(page)

    await wait_until(delivered, timeout=30)
    page = (await hooked.client.get(f"/ui/webhooks/{hook_id}")).text
    [delivery_id] = re.findall(r'<tr data-delivery="(\d+)">', page)
    row = row_of(page, "delivery", delivery_id)
    assert "task.finished" in row and f"#{task['id']}" in row and "HTTP 200" in row, row
    assert "HTTP 500" in row  # the failed tries are in its attempts
    listed = await hooked.client.get("/ui/webhooks")
    summary = row_of(listed.text, "webhook", hook_id)
    assert "delivered" in summary and "active" in summary and receiver.url() in summary, summary

    # Send it again: the receiver gets the same message id once more.
    first_id = receiver.received[0].message_id
    again = await hooked.client.post(
        f"/ui/webhooks/{hook_id}/deliveries/{delivery_id}/redeliver", headers=SAME_SITE
    )
    assert again.status_code == 303 and again.headers["location"] == f"/ui/webhooks/{hook_id}"
    await wait_until(lambda: len(receiver.received) >= 2, timeout=30)
    assert receiver.received[1].message_id == first_id

    paused = await hooked.client.post(f"/ui/webhooks/{hook_id}/pause", headers=SAME_SITE)
    assert paused.status_code == 303
    api = (await hooked.client.get(f"/api/v1/webhooks/{hook_id}")).json()
    assert api["enabled"] is False
    assert (
        'id="webhook-switch">Resume<' in (await hooked.client.get(f"/ui/webhooks/{hook_id}")).text
    )
    resumed = await hooked.client.post(f"/ui/webhooks/{hook_id}/resume", headers=SAME_SITE)
    assert resumed.status_code == 303
    assert (await hooked.client.get(f"/api/v1/webhooks/{hook_id}")).json()["enabled"] is True


async def test_deliveries_come_in_pages_and_bad_addresses_get_an_error_page(
    loopback_service: Service, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooked = loopback_service  # (the fixture's name, shorter)
    monkeypatch.setattr(webhook_pages, "PAGE_SIZE", 3)
    hook_id = await subscribe(hooked, receiver, event_types=["task.finished"])
    for n in range(4):
        await hooked.wait((await hooked.submit("summarize", text=f"paged {n}"))["id"])
    await wait_until(lambda: len(receiver.received) >= 4, timeout=30)
    first = (await hooked.client.get(f"/ui/webhooks/{hook_id}")).text
    ids = re.findall(r'<tr data-delivery="(\d+)">', first)
    older = re.search(r'href="([^"]+)" id="older"', first)
    assert len(ids) == 3 and older is not None, ids
    second = (await hooked.client.get(unescape(older.group(1)))).text
    rest = re.findall(r'<tr data-delivery="(\d+)">', second)
    assert len(rest) == 1 and int(rest[0]) < min(map(int, ids)), (ids, rest)
    assert 'id="older"' not in second and 'id="newest"' in second
    # Sent again from an older page: back to that page, which says so once.
    older_page = unescape(older.group(1))
    before = older_page.split("before=")[1]
    again = await hooked.client.post(
        f"/ui/webhooks/{hook_id}/deliveries/{rest[0]}/redeliver",
        data={"before": before},
        headers=SAME_SITE,
    )
    assert again.status_code == 303 and again.headers["location"] == older_page
    said = text_of((await hooked.client.get(again.headers["location"])).text)
    assert f"Delivery #{rest[0]} is queued to be sent again now." in said, said
    assert "queued to be sent again" not in (await hooked.client.get(older_page)).text
    # Paused, it says when it will go.
    assert (
        await hooked.client.post(f"/ui/webhooks/{hook_id}/pause", headers=SAME_SITE)
    ).is_redirect
    await hooked.client.post(
        f"/ui/webhooks/{hook_id}/deliveries/{rest[0]}/redeliver", headers=SAME_SITE
    )
    said = text_of((await hooked.client.get(f"/ui/webhooks/{hook_id}")).text)
    assert "will be sent again when this subscription is resumed (it is paused)" in said, said
    for path, status in (
        (f"/ui/webhooks/{hook_id}?before=abc", 400),
        ("/ui/webhooks/999999", 404),
        (f"/ui/webhooks/{hook_id}/deliveries/999999/redeliver", 404),
    ):
        send = hooked.client.post if path.endswith("redeliver") else hooked.client.get
        answer = await send(path, headers=SAME_SITE)
        assert answer.status_code == status, (path, answer.status_code)
        assert answer.headers["content-type"].startswith("text/html"), path


async def test_the_waiting_deliveries_are_counted_up_to_a_cap(
    loopback_service: Service, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused subscription's backlog may be large: the list counts it up to a cap, then
    says "at least"."""
    hooked = loopback_service
    hook_id = await subscribe(hooked, receiver, event_types=["task.finished"])
    await receiver.stop()  # nothing answers: the deliveries wait, retried
    for n in range(3):
        await hooked.wait((await hooked.submit("summarize", text=f"held {n}"))["id"])

    async def waiting() -> str:
        row = row_of((await hooked.client.get("/ui/webhooks")).text, "webhook", hook_id)
        return row.split("active", 1)[1].split()[0]

    assert await waiting() == "3"
    monkeypatch.setattr(db_webhooks, "COUNT_CAP", 2)
    assert await waiting() == "3+"


async def test_only_an_admin_sees_webhooks_and_only_a_submitter_pauses_schedules(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    keys = await make_keys(db_url, "admin", "read")
    async with start_service(no_workers(settings)) as svc:
        svc.client.headers["authorization"] = f"Bearer {keys['admin']}"
        made = await create(svc, every="1m")
        uploaded = await svc.client.post(
            "/api/v1/batches",
            params={"template": "summarize", "format": "csv"},
            content=b"text\none\ntwo\n",
        )
        assert uploaded.status_code == 201, uploaded.text
        batch = f"/ui/batches/{uploaded.json()['batch']['id']}"
        for scope, sees_webhooks in (("read", False), ("admin", True)):
            async with httpx.AsyncClient(base_url=svc.url, timeout=30, headers=SAME_SITE) as client:
                login = await client.post("/ui/login", data={"key": keys[scope], "next": "/ui/"})
                assert login.status_code == 303
                overview = (await client.get("/ui/")).text
                assert ('href="/ui/webhooks"' in overview) is sees_webhooks, scope
                assert 'href="/ui/schedules"' in overview
                webhooks = await client.get("/ui/webhooks")
                assert webhooks.status_code == (200 if sees_webhooks else 403), scope
                schedule = (await client.get(f"/ui/schedules/{made['id']}")).text
                assert ('id="schedule-switch">Pause<' in schedule) is sees_webhooks, scope
                paused = await client.post(f"/ui/schedules/{made['id']}/pause")
                assert paused.status_code == (303 if sees_webhooks else 403), scope
                # Every other write of these pages needs the submit scope too.
                shown = (await client.get(batch)).text
                assert ('id="cancel-batch"' in shown) is sees_webhooks, scope
                for write in (f"/ui/schedules/{made['id']}/run", f"{batch}/retry"):
                    answer = await client.post(write)
                    assert answer.status_code == (303 if sees_webhooks else 403), (scope, write)
                cancelled = await client.post(f"{batch}/cancel")
                assert cancelled.status_code == (303 if sees_webhooks else 403), scope


# -- batches ---------------------------------------------------------------------------------


async def test_a_batchs_page_shows_its_progress_and_first_failures_and_retries_them(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    body = b"text,n\nfine,1\nFAIL one,2\nbad,not-a-number\nalso fine,3\nFAIL two,4\n"
    answer = await upload(svc, body)
    batch_id = answer["batch"]["id"]
    await finished(svc, batch_id)
    listed = await svc.client.get("/ui/batches")
    row = row_of(listed.text, "batch", batch_id)
    assert "rowjob" in row and "100.0%" in row and "done" in row, row
    page = await svc.client.get(f"/ui/batches/{batch_id}")
    assert page.status_code == 200
    counts = dict(re.findall(r'<td data-status="(\w+)">([\d,]+)</td>', page.text))
    assert counts["succeeded"] == "2" and counts["failed"] == "2" and counts["invalid"] == "1"
    failed = re.findall(r'<tr data-row="(\d+)">', page.text)
    assert failed == ["2", "3", "5"], failed  # in row order, the refused one among them
    refused = row_of(page.text, "row", 3)
    assert "refused" in refused and "params.n" in refused, refused
    assert "step answer" in row_of(page.text, "row", 2)
    assert 'id="retry-batch"' in page.text and 'id="cancel-batch"' not in page.text
    # The download is the API's results (JSON lines by default, as there).
    plain = await svc.client.get(f"/ui/batches/{batch_id}/results")
    assert plain.headers["content-type"] == "application/x-ndjson"
    for fmt in ("csv", "jsonl"):
        mine = await svc.client.get(f"/ui/batches/{batch_id}/results", params={"format": fmt})
        api = await svc.client.get(f"/api/v1/batches/{batch_id}/results", params={"format": fmt})
        assert mine.status_code == 200 and mine.text == api.text, fmt
        assert mine.headers["content-type"] == api.headers["content-type"]

    fake_ollama.reply = lambda request: json.dumps({"echo": "fixed", "n": 0})
    retried = await svc.client.post(f"/ui/batches/{batch_id}/retry", headers=SAME_SITE)
    assert retried.status_code == 303
    assert retried.headers["location"] == f"/ui/batches/{batch_id}"
    shown = await svc.client.get(retried.headers["location"])
    assert "Queued again: 2 tasks." in shown.text
    again = await svc.client.get(retried.headers["location"])
    assert "Queued again" not in again.text  # said once
    progress = await finished(svc, batch_id)
    assert progress["counts"]["succeeded"] == 4


async def test_a_batch_whose_every_row_was_refused_says_no_task_was_made(svc: Service) -> None:
    """Not "100.0% done: 0 of 0 tasks finished": nothing ran, and the page says why."""
    answer = await upload(svc, b"text,n\nbad,x\nworse,y\n")
    batch_id = answer["batch"]["id"]
    page = await svc.client.get(f"/ui/batches/{batch_id}")
    line = text_of(re.search(r'<p id="batch-progress-line">.*?</p>', page.text, re.S)[0])
    assert line.startswith("No task was made") and "% done" not in line, line
    assert line.endswith("both of its rows were refused at upload."), line
    assert re.findall(r'<tr data-row="(\d+)">', page.text) == ["1", "2"]
    row = row_of((await svc.client.get("/ui/batches")).text, "batch", batch_id)
    assert "no task made: every row refused" in row and "%" not in text_of(row), row


async def test_a_batch_is_cancelled_from_its_page_and_the_list_comes_in_pages(
    batch_settings: Settings, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_pages, "PAGE_SIZE", 2)
    async with start_service(no_workers(batch_settings)) as idle:
        ids = [(await upload(idle, b"text\n" + b"x\n" * 40))["batch"]["id"] for _ in range(3)]
        page = (await idle.client.get(f"/ui/batches/{ids[0]}")).text
        assert 'id="cancel-batch"' in page and 'id="retry-batch"' not in page
        cancelled = await idle.client.post(f"/ui/batches/{ids[0]}/cancel", headers=SAME_SITE)
        assert cancelled.status_code == 303
        page = (await idle.client.get(cancelled.headers["location"])).text
        assert "Cancelled: 40 tasks." in page and 'id="cancel-batch"' not in page
        assert "data-live" not in page  # nothing left to follow
        body = await idle.client.get(f"/ui/batches/{ids[1]}/body")
        assert body.status_code == 200 and "<html" not in body.text
        # Nothing left to follow: htmx's "stop polling" (the page would poll for good).
        done = await idle.client.get(f"/ui/batches/{ids[0]}/body")
        assert done.status_code == 286 and 'id="batch-counts"' in done.text
        assert '<td data-status="queued">40</td>' in body.text
        live = (await idle.client.get(f"/ui/batches/{ids[1]}")).text
        assert f'hx-get="/ui/batches/{ids[1]}/body"' in live and "data-live" in live
        assert 'hx-trigger="every 2s"' in live
        # A big batch is counted less often: its counts are read over every row.
        sizes = [batch_pages.refresh_seconds(n) for n in (12, 100_000, 1_000_000, 5_000_000)]
        assert sizes == [2, 5, 50, 60]
        first = (await idle.client.get("/ui/batches")).text
        assert re.findall(r'<tr data-batch="(\d+)">', first) == [str(ids[2]), str(ids[1])]
        older = re.search(r'href="([^"]+)" id="older"', first)
        assert older is not None
        rest = (await idle.client.get(unescape(older.group(1)))).text
        assert re.findall(r'<tr data-batch="(\d+)">', rest) == [str(ids[0])]
        assert "cancelled" in row_of(rest, "batch", ids[0])
        for path, status in (
            ("/ui/batches?before=x", 400),
            ("/ui/batches/999999", 404),
            (f"/ui/batches/{ids[0]}/results?format=xml", 400),
        ):
            answer = await idle.client.get(path)
            assert answer.status_code == status, (path, answer.status_code)
            assert answer.headers["content-type"].startswith("text/html"), path


async def test_a_batch_still_uploading_says_so_and_its_cancel_says_what_it_did(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    """While rows arrive, the page counts the rows so far (not "100% of 0"), offers Cancel
    whatever is running, and the cancel's notice tells the running rows it asked to stop
    apart from those it cancelled."""
    fake_ollama.close_gate("llama3.2")  # the first rows hold their slots
    # 60 rows: a chunk of 50 is stored (and queued) while the rest of the body is awaited.
    first = b"text\n" + b"".join(b"early %d\n" % i for i in range(1, 61))
    released = asyncio.Event()

    async def chunked() -> AsyncIterator[bytes]:
        yield first
        await released.wait()
        yield b"late\n"

    uploading = asyncio.ensure_future(
        svc.client.post(
            "/api/v1/batches",
            params={"template": "rowjob", "format": "csv"},
            content=chunked(),
            headers={"Idempotency-Key": "uploading"},
        )
    )
    try:

        async def held() -> bool:
            return fake_ollama.held("llama3.2") >= 2

        await wait_until(held, timeout=30)
        [batch] = (await svc.client.get("/api/v1/batches")).json()["items"]
        page = (await svc.client.get(f"/ui/batches/{batch['id']}")).text
        said = text_of(page)
        assert "50 rows queued so far" in said and "% done" not in said, said
        assert "Rows counted when the upload ends" in said, said
        assert 'id="cancel-batch"' in page
        assert "50 so far" in row_of(
            (await svc.client.get("/ui/batches")).text, "batch", batch["id"]
        )
        running = fake_ollama.held("llama3.2")
        cancelled = await svc.client.post(f"/ui/batches/{batch['id']}/cancel", headers=SAME_SITE)
        shown = text_of((await svc.client.get(cancelled.headers["location"])).text)
        assert f"Cancelled: {50 - running} tasks; {running} running asked to stop" in shown, shown
    finally:
        released.set()
        fake_ollama.open_gate("llama3.2")
    answer = await uploading
    assert answer.status_code == 201, answer.text
    progress = await finished(svc, batch["id"])
    # The 11 rows read after the cancel are cancelled as they are stored.
    assert progress["counts"]["cancelled"] >= 61 - running, progress["counts"]


# -- in a browser ----------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_pause_and_resume_a_schedule_and_a_subscription_in_a_browser(
    loopback_service: Service, receiver: Receiver, browser: Browser
) -> None:
    hooked = loopback_service  # (the fixture's name, shorter)
    from playwright.async_api import expect

    made = await create(hooked, every="1h")
    hook_id = await subscribe(hooked, receiver, event_types=["task.finished"])
    page = await new_page(browser)
    await page.goto(f"{hooked.url}/ui/")
    await page.get_by_role("link", name="Schedules").click()
    await page.get_by_role("link", name="digest").click()
    await expect(page.page).to_have_url(f"{hooked.url}/ui/schedules/{made['id']}")
    switch = page.locator("#schedule-switch")
    await switch.click()
    await expect(page.locator("h1 .status")).to_have_text("paused")
    # The switch keeps the focus across the page's swap: Enter switches it back.
    await expect(switch).to_have_text("Resume")
    await expect(switch).to_be_focused()
    await page.page.keyboard.press("Enter")
    await expect(page.locator("h1 .status")).to_have_text("active")
    assert (await hooked.client.get("/api/v1/schedules/digest")).json()["enabled"] is True

    await page.get_by_role("link", name="Webhooks").click()
    await page.get_by_role("link", name=str(hook_id), exact=True).click()
    await page.click("#webhook-switch")
    await expect(page.locator("h1 .status")).to_have_text("paused")
    await expect(page.locator("#webhook-switch")).to_be_focused()
    assert (await hooked.client.get(f"/api/v1/webhooks/{hook_id}")).json()["enabled"] is False
    assert page.errors == []


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_send_again_keeps_the_keyboard_on_its_row(
    loopback_service: Service, receiver: Receiver, browser: Browser
) -> None:
    """A delivery sent again from far down its subscription's page: the page went to its top
    with the focus on its body, so a keyboard user going through deliveries started over
    after each one (helper-128)."""
    from playwright.async_api import expect

    hooked = loopback_service
    hook_id = await subscribe(hooked, receiver, event_types=["task.finished"])
    for n in range(20):
        await hooked.submit("summarize", text=f"t{n}")
    await wait_until(lambda: len(receiver.received) >= 20, timeout=60)
    page = await new_page(browser, viewport={"width": 1280, "height": 700})
    await page.goto(f"{hooked.url}/ui/webhooks/{hook_id}")
    rows = page.locator("tr[data-delivery]")
    await expect(rows).to_have_count(20)
    delivery = await rows.nth(15).get_attribute("data-delivery")
    button = page.locator(f"tr[data-delivery='{delivery}'] button")
    await button.focus()
    scrolled = await page.evaluate("window.scrollY")
    assert scrolled > 0
    await page.page.keyboard.press("Enter")
    await wait_until(lambda: len(receiver.received) >= 21, timeout=30)
    await expect(page.locator("body")).to_contain_text(f"Delivery #{delivery} is queued")
    await expect(page.locator(f"tr[data-delivery='{delivery}'] button")).to_be_focused()
    top, height = await page.evaluate(
        "() => [document.activeElement.getBoundingClientRect().top, window.innerHeight]"
    )
    assert 0 <= top < height, (top, height, await page.evaluate("window.scrollY"), scrolled)
    assert page.errors == []


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_a_running_batchs_page_follows_it_to_the_end(
    svc: Service, fake_ollama: FakeOllama, browser: Browser
) -> None:
    from playwright.async_api import expect

    fake_ollama.close_gate("llama3.2")  # the rows wait until the page is open
    batch_id = (await upload(svc, b"text\n" + b"row\n" * 12))["batch"]["id"]
    page = await new_page(browser)
    await page.goto(f"{svc.url}/ui/batches/{batch_id}")
    await expect(page.locator("#batch-progress")).to_have_text("0.0% done")
    assert await page.locator("#batch-body[data-live]").count() == 1
    fake_ollama.open_gate("llama3.2")
    await expect(page.locator("#batch-progress")).to_have_text("100.0% done", timeout=30_000)
    await expect(page.locator('td[data-status="succeeded"]')).to_have_text("12")
    assert await page.locator("#cancel-batch").count() == 0
    assert page.errors == []
