"""Webhooks: subscriptions, signed deliveries from the outbox, retries while the receiver is
down, the outbox surviving a SIGKILL, and destinations that are refused."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import select

from orchestra.client import AsyncClient
from orchestra.config import Settings, WebhookSettings
from orchestra.db import Database, TaskStore
from orchestra.db.tables import webhook_deliveries
from orchestra.db.webhooks import PAUSED, Hint, WebhookStore
from orchestra.domain import NewTask, iso_now
from orchestra.webhooks import (
    DestinationRefused,
    Webhook,
    backoff,
    is_public,
    new_secret,
    parse_destination,
)
from tests.conftest import Service, StartService, make_settings, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, start_process, wait_until, write_config
from tests.fixtures.webhook_receiver import Received, Receiver

#: Quick retries, so a test waits fractions of a second between attempts.
QUICK = {"retry_base_seconds": 0.05, "retry_max_seconds": 0.3, "poll_interval": 0.2}


def with_webhooks(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(
        settings, webhooks=msgspec.structs.replace(settings.webhooks, **changes)
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver()
    await hooks.start()
    try:
        yield hooks
    finally:
        await hooks.stop()


@pytest.fixture
async def loopback_service(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> AsyncIterator[Service]:
    """A service that may send to loopback (the receiver is there), retrying quickly."""
    settings = with_webhooks(make_settings(db_url, fake_ollama.url), allow_private=True, **QUICK)
    async with start_service(settings) as svc:
        yield svc


async def subscribe(svc: Service, receiver: Receiver, path: str = "/hook", **body: Any) -> int:
    response = await svc.client.post("/api/v1/webhooks", json={"url": receiver.url(path), **body})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["secret"].startswith("whsec_")
    # Where it lives, as every created resource says.
    assert response.headers["location"] == f"/api/v1/webhooks/{created['id']}"
    receiver.secrets[path] = created["secret"]
    return int(created["id"])


async def deliveries(svc: Service, webhook_id: int) -> list[dict[str, Any]]:
    response = await svc.client.get(f"/api/v1/webhooks/{webhook_id}/deliveries?limit=200")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# -- what is refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "https://10.0.0.1/x"]
)
async def test_private_destinations_are_refused_with_422_naming_url(
    service: Service, url: str
) -> None:
    response = await service.client.post("/api/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    body = response.json()
    assert [f["field"] for f in body["fields"]] == ["url"]
    assert "private" in body["message"]
    listed = await service.client.get("/api/v1/webhooks")
    assert listed.json()["items"] == []


async def test_a_name_is_judged_by_the_address_it_resolves_to(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/webhooks", json={"url": "http://localhost:9/hook"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["fields"][0]["field"] == "url"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"url": "not a url"}, 400, "url"),
        ({"url": "ftp://example.com/x"}, 400, "url"),
        ({"url": "http://user:pw@example.com/x"}, 400, "url"),
        ({"url": "http:///nohost"}, 400, "url"),
        ({"url": "http://example.com/", "template": "nope"}, 404, "nope"),
        ({"url": ""}, 400, "url"),
        ({}, 400, "url"),
        ({"url": "http://example.com/", "event_types": ["task.exploded"]}, 400, "event_types"),
        ({"url": "http://example.com/", "event_types": []}, 400, "event_types"),
        ({"url": "http://example.com/", "colour": "red"}, 400, "colour"),
    ],
)
async def test_bad_subscriptions_get_a_4xx_naming_the_field(
    service: Service, body: dict[str, Any], status: int, field: str
) -> None:
    response = await service.client.post("/api/v1/webhooks", json=body)
    assert response.status_code == status, response.text
    assert field in response.text


async def test_a_private_callback_url_is_refused_at_submit(service: Service) -> None:
    body = {
        "template": "summarize",
        "params": {"text": "x"},
        "callback_url": "http://169.254.169.254/",
    }
    response = await service.client.post("/api/v1/tasks", json=body)
    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["fields"]] == ["callback_url"]
    listed = await service.client.get("/api/v1/tasks")
    assert listed.json()["items"] == [], "nothing is queued"


async def test_the_list_comes_in_pages_oldest_first_and_the_client_follows_them(
    loopback_service: Service,
) -> None:
    made = []
    for n in range(12):
        hook = await loopback_service.client.post(
            "/api/v1/webhooks", json={"url": f"http://127.0.0.1:9/hook/{n}"}
        )
        assert hook.status_code == 201, hook.text
        made.append(hook.json()["id"])
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        page = (await loopback_service.client.get("/api/v1/webhooks", params=params)).json()
        assert len(page["items"]) <= 5
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert cursor == str(seen[-1])
    assert seen == made
    for bad in ({"limit": 0}, {"limit": 501}, {"cursor": "x"}):
        refused = await loopback_service.client.get("/api/v1/webhooks", params=bad)
        assert refused.status_code == 400, refused.text
    async with AsyncClient(loopback_service.url) as client:
        assert [h.id for h in await client.list_webhooks(page_size=4)] == made


async def test_unknown_webhooks_are_404(service: Service) -> None:
    assert (await service.client.delete("/api/v1/webhooks/99")).status_code == 404
    assert (await service.client.get("/api/v1/webhooks/99/deliveries")).status_code == 404
    response = await service.client.post("/api/v1/webhooks/99/deliveries/1/redeliver")
    assert response.status_code == 404


def test_a_port_out_of_range_is_refused_before_anything_is_sent() -> None:
    for url in ("http://93.184.216.34:99999/x", "https://93.184.216.34:0/"):
        with pytest.raises(DestinationRefused) as refused:
            parse_destination(url)
        assert refused.value.fields[0].field == "url"
        assert "a port is 1 to 65535" in refused.value.fields[0].message
    assert parse_destination("https://93.184.216.34:65535/") == ("https", "93.184.216.34", 65535)


def test_addresses_that_are_not_public() -> None:
    refused = ["127.0.0.1", "10.0.0.1", "169.254.169.254", "192.168.1.1", "::1", "fe80::1"]
    refused += ["::ffff:127.0.0.1", "100.64.0.1", "0.0.0.0", "224.0.0.1"]
    for private in refused:
        assert not is_public(private), private
    assert is_public("93.184.216.34") and is_public("2606:4700::1111")


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    settings = WebhookSettings(retry_base_seconds=1.0, retry_max_seconds=8.0)
    rand = random.Random(7)
    waits = [[backoff(n, settings, rand) for _ in range(50)] for n in (1, 2, 3, 4, 9)]
    for n, ceiling in zip((1, 2, 3, 4, 9), (1, 2, 4, 8, 8), strict=True):
        got = waits[(1, 2, 3, 4, 9).index(n)]
        assert all(ceiling / 2 <= w <= ceiling for w in got)
        assert len(set(got)) > 1, "jittered"


# -- delivery -------------------------------------------------------------------------------


async def test_every_delivery_is_signed_and_verifies(
    loopback_service: Service, receiver: Receiver
) -> None:
    svc = loopback_service
    hook = await subscribe(svc, receiver, event_types=["task.queued", "task.finished"])
    other = await subscribe(svc, receiver, "/other", template="translate")
    ids = [(await svc.submit("summarize", text=f"t{i}"))["id"] for i in range(3)]
    for task_id in ids:
        await svc.wait(task_id)
    await wait_until(lambda: len(receiver.ids("task.finished")) == 3, timeout=20)
    await wait_until(lambda: len(receiver.ids("task.queued")) == 3, timeout=20)
    assert receiver.rejected == []
    assert all(r.path == "/hook" for r in receiver.received), "the template filter holds"
    finished = {r.body["data"]["task_id"]: r.body for r in receiver.received
                if r.body["type"] == "task.finished"}  # fmt: skip
    assert sorted(finished) == sorted(ids)
    one = finished[ids[0]]
    assert one["data"]["template"] == "summarize"
    assert one["data"]["status"] == "succeeded"
    assert one["data"]["event"] == {"status": "succeeded"}
    assert one["timestamp"].endswith("Z")
    assert len(set(receiver.ids())) == 6, "each delivery has its own webhook-id"

    # The receiver has the requests; the sender records each answer just after.
    async def recorded() -> bool:
        return {d["status"] for d in await deliveries(svc, hook)} == {"delivered"}

    await wait_until(recorded, timeout=10)
    listed = await deliveries(svc, hook)
    assert len(listed) == 6
    first = listed[0]["attempts"][0]
    assert first["status_code"] == 200 and first["latency_ms"] >= 0
    assert first["response"] == '{"ok": true}'
    assert await deliveries(svc, other) == []


async def test_an_event_writes_a_delivery_for_each_subscription_it_matches(
    db: Database, db_url: str
) -> None:
    """The outbox, at the store: a delivery per matching subscription, with the body in full,
    committed with its event, and the sender's hint moved only when one was written (the
    sender claims on a commit only then). One event and a claim's several at once."""
    tasks, hooks = TaskStore(db), WebhookStore(db)

    def new(template: str) -> NewTask:
        return NewTask(template=template, template_version=1, params={"text": "x"})

    def written() -> list[tuple[Any, ...]]:
        return sql_rows(db_url, "SELECT webhook_id, task_id, event_seq, type, payload, status "
                        "FROM webhook_deliveries ORDER BY id")  # fmt: skip

    hint = Hint.written
    await tasks.enqueue(new("summarize"))  # no subscription yet
    assert (written(), Hint.written) == ([], hint)

    at = iso_now()
    queued = await hooks.create(
        Webhook(0, "https://example.com/q", ["task.queued"], "summarize", None, True, at), "s"
    )
    started = await hooks.create(
        Webhook(0, "https://example.com/s", ["task.started"], None, None, True, at), "s"
    )
    hint = Hint.written
    await tasks.enqueue(new("translate"))  # its template is not the one subscribed to
    assert (written(), Hint.written) == ([], hint)

    task = (await tasks.enqueue(new("summarize"))).task
    assert Hint.written > hint
    [(hook, task_id, seq, kind, payload, status)] = written()
    [(event_time, event_data)] = sql_rows(
        db_url, "SELECT time, data FROM task_events WHERE task_id = ? AND seq = 1", (task.id,)
    )
    assert (hook, task_id, seq, kind, status) == (queued.id, task.id, 1, "task.queued", "pending")
    assert msgspec.json.decode(payload) == {
        "type": "task.queued",
        "timestamp": event_time,
        "data": {
            "task_id": task.id,
            "template": "summarize",
            "status": "queued",
            "seq": 1,
            "event": msgspec.json.decode(event_data),
        },
    }

    hint = Hint.written
    claimed = await tasks.claim("w", 10, 30)  # three task.started events in one statement
    assert len(claimed) == 3 and Hint.written > hint
    rows = written()[1:]
    assert sorted((r[0], r[1], r[3]) for r in rows) == [
        (started.id, t.id, "task.started") for t in sorted(claimed, key=lambda t: t.id)
    ]
    assert {msgspec.json.decode(r[4])["data"]["status"] for r in rows} == {"running"}


async def test_a_disabled_subscription_gets_no_deliveries_and_its_pending_ones_wait(
    db: Database,
) -> None:
    """At the store: a disabled subscription gets no delivery for a new event, and the one
    it had pending is neither due nor claimed until it is enabled again."""
    tasks, hooks = TaskStore(db), WebhookStore(db)
    hook = await hooks.create(
        Webhook(0, "https://example.com/h", ["task.queued"], None, None, True, iso_now()), "s"
    )
    new = NewTask(template="summarize", template_version=1, params={}, model=None)
    await tasks.enqueue(new)
    assert await hooks.any_due(iso_now())
    assert await hooks.update(hook.id, {"enabled": 0}, iso_now()) is not None
    await tasks.enqueue(new)  # no delivery for it
    assert not await hooks.any_due(iso_now())
    assert await hooks.claim("sender", 10, iso_now(), "2999-01-01T00:00:00.000000Z") == []
    [waiting] = await hooks.deliveries(hook.id, 10, None)
    # Out of the due index's way while paused: a claim's walk never passes over it.
    assert (waiting.task_id, waiting.next_attempt_at) == (1, PAUSED)
    # Sent again while paused, it waits for the resume as well (it was due at once: in every
    # claim's way, and its answer said a time it would not be sent at).
    assert await hooks.redeliver(hook.id, waiting.id, iso_now())
    [waiting] = await hooks.deliveries(hook.id, 10, None)
    assert (waiting.status, waiting.next_attempt_at) == ("pending", PAUSED)
    resumed = iso_now()
    await hooks.update(hook.id, {"enabled": 1}, resumed)
    # Its retry window starts at the resume, not at the click (a day paused spent it all).
    async with db.read() as conn:
        window = await conn.scalar(
            select(webhook_deliveries.c.retry_from).where(webhook_deliveries.c.id == waiting.id)
        )
    assert window == resumed
    [claimed] = await hooks.claim("sender", 10, iso_now(), "2999-01-01T00:00:00.000000Z")
    assert (claimed.webhook_id, claimed.secret, claimed.previous_secret) == (hook.id, "s", None)


async def test_a_subscription_is_changed_and_its_secret_rolled_over_without_a_gap(
    loopback_service: Service, receiver: Receiver, db_url: str
) -> None:
    svc = loopback_service
    hook = await subscribe(svc, receiver, event_types=["task.finished"])
    old_secret = receiver.secrets["/hook"]

    async def finish_one() -> Received:
        task = await svc.submit("summarize", text="x")
        await wait_until(
            lambda: (
                any(r.body["data"]["task_id"] == task["id"] for r in receiver.received)
                or len(receiver.rejected) > 0
            ),
            timeout=20,
        )
        assert receiver.rejected == [], receiver.rejected
        return receiver.received[-1]

    # Changes: only the fields given; a template that does not exist, a bad URL, a callback.
    changed = await svc.client.patch(
        f"/api/v1/webhooks/{hook}", json={"event_types": ["task.finished", "task.queued"]}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["event_types"] == ["task.finished", "task.queued"]
    assert changed.json()["url"] == receiver.url("/hook") and changed.json()["enabled"] is True
    for body, status in (
        ({"template": "nope"}, 404),
        ({"url": "ftp://example.com/"}, 400),  # malformed: 400 as any field
        ({"event_types": []}, 400),
        ({"colour": "red"}, 400),
    ):
        refused = await svc.client.patch(f"/api/v1/webhooks/{hook}", json=body)
        assert refused.status_code == status, (body, refused.text)
    assert (await svc.client.patch("/api/v1/webhooks/999", json={})).status_code == 404
    await svc.client.patch(f"/api/v1/webhooks/{hook}", json={"event_types": ["task.finished"]})

    # Rolled over with an hour's overlap: the receiver still on the old secret verifies, and
    # so does one on the new secret; each delivery carries both signatures.
    rolled = await svc.client.post(f"/api/v1/webhooks/{hook}/roll-secret?overlap=3600")
    assert rolled.status_code == 200, rolled.text
    new_secret = rolled.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != old_secret
    assert rolled.json()["previous_secret_until"] > iso_now()
    assert "secret" not in (await svc.client.get(f"/api/v1/webhooks/{hook}")).json()
    got = await finish_one()
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    receiver.secrets["/hook"] = new_secret
    await finish_one()

    # Rolled over again with no overlap: only the newest secret signs.
    newest = (await svc.client.post(f"/api/v1/webhooks/{hook}/roll-secret?overlap=0")).json()
    receiver.secrets["/hook"] = newest["secret"]
    got = await finish_one()
    assert len(got.headers["webhook-signature"].split(" ")) == 1
    stored = sql_rows(db_url, "SELECT secret FROM webhooks WHERE id = ?", (hook,))
    assert stored == [(newest["secret"],)]
    too_long = await svc.client.post(f"/api/v1/webhooks/{hook}/roll-secret?overlap=9999999")
    assert too_long.status_code == 400, too_long.text

    # Disabled: nothing is sent for it; enabled again, it gets the next events.
    off = await svc.client.patch(f"/api/v1/webhooks/{hook}", json={"enabled": False})
    assert off.json()["enabled"] is False
    quiet = await svc.submit("summarize", text="while disabled")
    await svc.wait(quiet["id"])
    await svc.client.patch(f"/api/v1/webhooks/{hook}", json={"enabled": True})
    got = await finish_one()
    assert quiet["id"] not in {r.body["data"]["task_id"] for r in receiver.received}
    assert quiet["id"] not in {d["task_id"] for d in await deliveries(svc, hook)}


async def test_a_subscription_created_paused_gets_nothing_until_it_is_enabled(
    loopback_service: Service, receiver: Receiver
) -> None:
    """A receiver set up with the secret it is given after the subscription is made: created
    paused, nothing is sent to it meanwhile (it could only refuse the signature)."""
    svc = loopback_service
    hook = await subscribe(svc, receiver, enabled=False)
    assert (await svc.client.get(f"/api/v1/webhooks/{hook}")).json()["enabled"] is False
    quiet = await svc.submit("summarize", text="while paused")
    await svc.wait(quiet["id"])
    await svc.client.patch(f"/api/v1/webhooks/{hook}", json={"enabled": True})
    heard = await svc.submit("summarize", text="enabled")
    await wait_until(lambda: receiver.received, timeout=20)
    assert [r.body["data"]["task_id"] for r in receiver.received] == [heard["id"]]
    assert [d["task_id"] for d in await deliveries(svc, hook)] == [heard["id"]]
    assert receiver.rejected == []


async def test_failed_deliveries_are_retried_and_all_arrive_once_the_receiver_is_back(
    loopback_service: Service, receiver: Receiver
) -> None:
    svc = loopback_service
    hook = await subscribe(svc, receiver)
    await receiver.stop()
    ids = [(await svc.submit("summarize", text=f"t{i}"))["id"] for i in range(5)]

    async def retried() -> bool:
        return all(len(d["attempts"]) >= 2 for d in await deliveries(svc, hook)) and len(
            await deliveries(svc, hook)
        ) == len(ids)

    await wait_until(retried, timeout=20, interval=0.1)
    failing = (await deliveries(svc, hook))[0]
    assert failing["status"] == "pending"
    assert failing["attempts"][0]["status_code"] is None
    assert failing["attempts"][0]["error"]

    receiver.status = 503  # up, but failing: an answer that is not 2xx is retried too
    await receiver.start()

    async def answered_503() -> bool:
        codes = [a["status_code"] for d in await deliveries(svc, hook) for a in d["attempts"]]
        return 503 in codes

    await wait_until(answered_503, timeout=20, interval=0.1)
    receiver.status = 200
    await wait_until(lambda: len(set(receiver.ids())) == len(ids), timeout=30)
    got = sorted(r.body["data"]["task_id"] for r in receiver.received)
    assert sorted(set(got)) == sorted(ids)
    assert receiver.rejected == []

    async def all_delivered() -> bool:
        return {d["status"] for d in await deliveries(svc, hook)} == {"delivered"}

    await wait_until(all_delivered, timeout=10)


async def test_a_delivery_can_be_sent_again_with_the_same_id(
    loopback_service: Service, receiver: Receiver
) -> None:
    svc = loopback_service
    hook = await subscribe(svc, receiver)
    await svc.wait((await svc.submit("summarize", text="again"))["id"])
    await wait_until(lambda: len(receiver.received) == 1, timeout=20)

    async def delivered() -> bool:
        return [d["status"] for d in await deliveries(svc, hook)] == ["delivered"]

    await wait_until(delivered, timeout=20)
    [delivery] = await deliveries(svc, hook)
    await receiver.stop()  # so that the redelivery cannot be delivered before the answer
    response = await svc.client.post(
        f"/api/v1/webhooks/{hook}/deliveries/{delivery['id']}/redeliver"
    )
    assert response.status_code == 202, response.text
    queued = response.json()  # the delivery, queued again (it answered null)
    assert (queued["id"], queued["message_id"], queued["status"]) == (
        delivery["id"],
        delivery["message_id"],
        "pending",
    )
    assert queued["finished_at"] is None and queued["next_attempt_at"] is not None
    assert queued["payload"] == delivery["payload"]
    assert queued["attempts"][0]["attempt"] == 1  # its history stays
    await receiver.start()
    await wait_until(lambda: len(receiver.received) == 2, timeout=20)
    first, second = receiver.received
    assert first.message_id == second.message_id == delivery["message_id"]
    assert first.body == second.body
    assert first.headers["webhook-signature"] != "" and receiver.rejected == []
    # Still written when its event happened: the redelivery starts its retry window anew
    # without rewriting that (it did, before).
    [again] = await deliveries(svc, hook)
    assert again["created_at"] == delivery["created_at"]


async def test_a_redelivery_asked_while_a_send_is_in_flight_keeps_that_attempt(
    loopback_service: Service, receiver: Receiver
) -> None:
    """ "Every attempt is recorded": the send in flight when a person asked to send it again
    lost its lease to the redelivery, and its attempt (answered 200) was dropped."""
    svc = loopback_service
    receiver.gate.clear()  # the first send is held until the redelivery is asked
    hook = await subscribe(svc, receiver)
    await svc.wait((await svc.submit("summarize", text="slow receiver"))["id"])
    await wait_until(lambda: receiver.in_flight == 1, timeout=20)
    [delivery] = await deliveries(svc, hook)
    again = await svc.client.post(f"/api/v1/webhooks/{hook}/deliveries/{delivery['id']}/redeliver")
    assert again.status_code == 202, again.text
    assert again.json()["attempts"] == []  # the held send has recorded nothing yet
    receiver.gate.set()

    async def both_recorded() -> bool:
        [now] = await deliveries(svc, hook)
        return now["status"] == "delivered" and len(now["attempts"]) == 2

    await wait_until(both_recorded, timeout=20, interval=0.1)
    [done] = await deliveries(svc, hook)
    assert [(a["attempt"], a["status_code"]) for a in done["attempts"]] == [(1, 200), (2, 200)]
    assert len(receiver.received) == 2


@pytest.mark.parametrize("status", [429, 503])
async def test_a_receiver_that_asks_to_wait_with_retry_after_is_left_alone_that_long(
    loopback_service: Service, receiver: Receiver, status: int
) -> None:
    """A busy receiver's ``Retry-After`` is honoured (as the service honours a model
    server's): it was retried at the backoff's pace (here 0.3 s at most) whatever it asked."""
    svc = loopback_service
    receiver.status, receiver.extra_headers = status, b"retry-after: 30\r\n"
    hook = await subscribe(svc, receiver)
    await svc.wait((await svc.submit("summarize", text="busy"))["id"])

    async def tried() -> list[dict[str, Any]]:
        found = await deliveries(svc, hook)
        return found if found and found[0]["attempts"] else []

    await wait_until(tried, timeout=20, interval=0.1)
    [delivery] = await tried()
    [attempt] = delivery["attempts"]
    assert attempt["status_code"] == status
    waited = datetime.fromisoformat(delivery["next_attempt_at"]) - datetime.fromisoformat(
        attempt["time"]
    )
    assert 29 <= waited.total_seconds() <= 35, (attempt, delivery["next_attempt_at"])


async def test_a_retry_after_past_the_window_gets_one_last_try_at_its_end(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService, receiver: Receiver
) -> None:
    """Asked to wait longer than the delivery's window has left, it is tried once more at
    the window's end (it was given up at once: the clock, read twice, put it just past)."""
    receiver.status, receiver.extra_headers = 503, b"retry-after: 86400\r\n"
    window = 0.02  # hours: 72 s
    settings = with_webhooks(
        make_settings(db_url, fake_ollama.url), allow_private=True, retry_hours=window, **QUICK
    )
    async with start_service(settings) as svc:
        hook = await subscribe(svc, receiver)
        await svc.wait((await svc.submit("summarize", text="busy for a day"))["id"])

        async def tried() -> list[dict[str, Any]]:
            found = await deliveries(svc, hook)
            return found if found and found[0]["attempts"] else []

        await wait_until(tried, timeout=20, interval=0.1)
        [delivery] = await tried()
    assert delivery["status"] == "pending", delivery
    made = datetime.fromisoformat(delivery["created_at"])
    due = datetime.fromisoformat(delivery["next_attempt_at"])
    assert abs((due - made).total_seconds() - window * 3600) < 5, delivery


async def test_a_receiver_that_answers_410_gone_is_not_sent_that_delivery_again(
    loopback_service: Service, receiver: Receiver
) -> None:
    """410: the receiver says the address is gone for good (a delivery was retried for a
    day); the delivery fails at once, and may still be sent again by hand."""
    svc = loopback_service
    receiver.status = 410
    hook = await subscribe(svc, receiver)
    await svc.wait((await svc.submit("summarize", text="gone"))["id"])

    async def failed() -> bool:
        found = await deliveries(svc, hook)
        return bool(found) and found[0]["status"] == "failed"

    await wait_until(failed, timeout=20, interval=0.1)
    [delivery] = await deliveries(svc, hook)
    assert [a["status_code"] for a in delivery["attempts"]] == [410]


@contextlib.contextmanager
def dropping(host: str, port: int) -> Iterator[None]:
    """A listener at ``host``:``port`` whose backlog is full: a new connection's SYN is
    dropped, and its connect waits (a firewalled address, a missing route)."""
    listener = socket.socket()
    listener.bind((host, port))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):  # past the backlog: later SYNs go unanswered
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, port))
            fillers.append(filler)
        yield
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("first", ["refuses", "drops"])
async def test_a_name_with_several_addresses_is_tried_address_by_address(
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    first: str,
) -> None:
    """With private addresses refused, a delivery connects to the addresses it checked, not
    to the name again: it tried only the first, and a receiver whose first address does
    not answer (IPv6 first on a host without its route) failed every attempt for a day.
    Each address has its share of the attempt's time to connect: one that drops the
    connection silently took all of it (review).

    The name's two addresses are given by a stand-in resolver (no test can make a name
    resolve to two addresses otherwise), both taken as public: the first refuses (nothing
    listens on 127.0.0.2) or drops (a full backlog on 127.0.0.3), 127.0.0.1 answers."""
    import orchestra.webhook_sender
    import orchestra.webhooks

    other = "127.0.0.2" if first == "refuses" else "127.0.0.3"

    async def two_addresses(host: str, port: int) -> list[str]:
        return [other, "127.0.0.1"] if host == "hooks.example" else [host]

    for module in (orchestra.webhooks, orchestra.webhook_sender):
        monkeypatch.setattr(module, "resolve", two_addresses)
        monkeypatch.setattr(module, "is_public", lambda address: address.startswith("127."))
    settings = with_webhooks(
        make_settings(db_url, fake_ollama.url), allow_private=False, **{**QUICK, "timeout": 4.0}
    )
    hold = dropping(other, receiver.port) if first == "drops" else contextlib.nullcontext()
    with hold:
        async with start_service(settings) as svc:
            url = f"http://hooks.example:{receiver.port}/hook"
            made = await svc.client.post("/api/v1/webhooks", json={"url": url})
            assert made.status_code == 201, made.text
            receiver.secrets["/hook"] = made.json()["secret"]
            await svc.wait((await svc.submit("summarize", text="two addresses"))["id"])
            await wait_until(lambda: len(receiver.received) == 1, timeout=20)

            # The attempt is recorded once its answer is read, after the receiver has it.
            async def recorded() -> bool:
                found = await deliveries(svc, made.json()["id"])
                return [d["status"] for d in found] == ["delivered"]

            await wait_until(recorded, timeout=10)
            [delivery] = await deliveries(svc, made.json()["id"])
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    assert receiver.received[0].headers["host"] == f"hooks.example:{receiver.port}"


async def test_a_deleted_subscription_gets_nothing_more(
    loopback_service: Service, receiver: Receiver
) -> None:
    svc = loopback_service
    hook = await subscribe(svc, receiver)
    assert (await svc.client.delete(f"/api/v1/webhooks/{hook}")).status_code == 204
    await svc.wait((await svc.submit("summarize", text="nobody listens"))["id"])
    assert (await svc.client.get("/api/v1/webhooks")).json()["items"] == []
    assert (await svc.client.get(f"/api/v1/webhooks/{hook}/deliveries")).status_code == 404


async def test_a_callback_url_gets_the_task_finished_signed_with_the_callback_secret(
    loopback_service: Service, receiver: Receiver, db_url: str
) -> None:
    svc = loopback_service
    secret = (await svc.client.get("/api/v1/webhooks/callback-secret")).json()["secret"]
    assert secret.startswith("whsec_")
    receiver.secrets["/done"] = secret
    body = {"template": "summarize", "params": {"text": "x"}, "callback_url": receiver.url("/done")}
    response = await svc.client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    await svc.submit("summarize", text="no callback")
    await wait_until(lambda: len(receiver.received) == 1, timeout=20)
    [got] = receiver.received
    assert got.body["type"] == "task.finished"
    assert got.body["data"]["task_id"] == task_id
    assert receiver.rejected == []
    # Subscriptions list leaves callbacks out, and their routes do not reach one.
    assert (await svc.client.get("/api/v1/webhooks")).json()["items"] == []
    (callback,) = sql_rows(db_url, "SELECT id FROM webhooks")
    for path in ("", "/deliveries"):
        response = await svc.client.get(f"/api/v1/webhooks/{callback[0]}{path}")
        assert response.status_code == 404, response.text
    assert (await svc.client.delete(f"/api/v1/webhooks/{callback[0]}")).status_code == 404
    assert sql_rows(db_url, "SELECT count(*) FROM webhooks") == [(1,)]


async def test_no_more_than_max_per_host_deliveries_go_to_one_host_at_once(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService, receiver: Receiver
) -> None:
    settings = make_settings(db_url, fake_ollama.url)
    settings = with_webhooks(settings, allow_private=True, max_per_host=2, **QUICK)
    receiver.delay = 0.3
    async with start_service(settings) as svc:
        await subscribe(svc, receiver, event_types=["task.queued"])
        for i in range(8):
            await svc.submit("summarize", text=f"t{i}")
        await wait_until(lambda: len(receiver.received) == 8, timeout=30)
    assert receiver.max_in_flight == 2


@pytest.mark.parametrize(
    ("paths", "tasks", "bound"),
    [
        # One slow subscription's backlog: another host's delivery went out only after it all
        # (418 s late in an exploratory run). The limit counted the host without its port,
        # and the claim took the backlog's oldest-due rows first, to hand them back.
        (["/hook"], 100, 15.0),
        # Two subscriptions on the busy host: only the one with a send in flight was left
        # out, the other's backlog filled every claim, and the other host waited 47.7 s
        # (helper-119). A host at its limit leaves every subscription of it out.
        (["/first", "/second"], 60, 25.0),
    ],
)
async def test_a_hosts_backlog_does_not_hold_back_another_hosts_deliveries(
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    receiver: Receiver,
    paths: list[str],
    tasks: int,
    bound: float,
) -> None:
    settings = make_settings(db_url, fake_ollama.url)
    settings = with_webhooks(settings, allow_private=True, max_per_host=1, concurrency=2, **QUICK)
    receiver.delay = 1.0
    other = Receiver()
    await other.start()
    # A backlog big enough that a claim round cannot pass over it before the rows it handed
    # back (for 0.2 s) are due again: 4 events a task, to each subscription.
    events = ["task.queued", "task.started", "step.finished", "task.finished"]
    backlog = tasks * len(events) * len(paths)
    try:
        async with start_service(settings) as svc:
            for path in paths:
                await subscribe(svc, receiver, path, event_types=events)
            ids = [(await svc.submit("summarize", text=f"t{i}"))["id"] for i in range(tasks)]
            for task_id in ids:
                await svc.wait(task_id)
            await subscribe(svc, other, event_types=["task.queued"])
            loop = asyncio.get_running_loop()
            sent = loop.time()
            await svc.submit("summarize", text="for all")
            await wait_until(lambda: len(other.received) == 1, timeout=60)
            took = loop.time() - sent
            backlog_left = backlog - len(receiver.received)
    finally:
        await other.stop()
    assert took < bound and backlog_left > backlog * 3 // 4, (took, backlog_left)
    assert receiver.max_in_flight == 1


async def test_a_send_answered_while_the_service_stops_is_recorded_not_sent_again(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService, receiver: Receiver
) -> None:
    """A stop cancelled the sends in flight at once: one the receiver had just answered was
    handed back with no record, and sent again at the next start (the same webhook-id
    twice). A stop gives them a second."""
    settings = make_settings(db_url, fake_ollama.url)
    settings = with_webhooks(settings, allow_private=True, **QUICK)
    receiver.delay = 0.4
    async with start_service(settings) as svc:
        hook = await subscribe(svc, receiver, event_types=["task.queued"])
        await svc.submit("summarize", text="in flight")
        await wait_until(lambda: receiver.in_flight == 1, timeout=15)
    rows = sql_rows(
        db_url, "SELECT status, attempts FROM webhook_deliveries WHERE webhook_id = ?", (hook,)
    )
    assert rows == [("delivered", 1)], rows
    assert len(receiver.received) == 1


async def test_redirects_are_not_followed(loopback_service: Service, receiver: Receiver) -> None:
    svc = loopback_service
    hook = await subscribe(svc, receiver)
    receiver.secrets["/moved"] = receiver.secrets["/hook"]
    receiver.status = 302
    await svc.wait((await svc.submit("summarize", text="redirected"))["id"])

    async def tried_twice() -> bool:
        items = await deliveries(svc, hook)
        return bool(items) and len(items[0]["attempts"]) >= 2

    await wait_until(tried_twice, timeout=20, interval=0.1)
    [delivery] = await deliveries(svc, hook)
    assert delivery["status"] == "pending", "a 3xx is a failed attempt, retried"
    assert {a["status_code"] for a in delivery["attempts"]} == {302}
    assert "/moved" not in receiver.paths


# -- the outbox across a crash --------------------------------------------------------------


async def test_pending_deliveries_are_sent_after_the_service_is_killed_and_restarted(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    port, config = free_port(), tmp_path / "hooks.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, poll_interval=0.2)
    with config.open("a") as f:
        # A delivery in flight at the kill is due again when its lease (timeout + 5 s) ends.
        f.write("[webhooks]\nallow_private = true\npoll_interval = 0.2\ntimeout = 2\n")
        f.write("retry_base_seconds = 0.2\nretry_max_seconds = 0.5\n")
    await receiver.stop()
    first = await start_process(config)
    import httpx

    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            made = await client.post("/api/v1/webhooks", json={"url": receiver.url()})
            assert made.status_code == 201, made.text
            receiver.secrets["/hook"] = made.json()["secret"]
            body = {"template": "summarize", "params": {"text": "outbox"}}
            ids = [(await client.post("/api/v1/tasks", json=body)).json()["id"] for _ in range(6)]

        def finished_and_tried() -> bool:
            [(n,)] = sql_rows(
                db_url,
                "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' "
                "AND attempts >= 1",
            )
            return int(n) == len(ids)

        await wait_until(finished_and_tried, timeout=30, interval=0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    assert receiver.received == []

    await receiver.start()
    second = await start_process(config)

    def all_recorded() -> bool:  # received, and the answer recorded (before the stop)
        [(left,)] = sql_rows(
            db_url, "SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'"
        )
        return len(set(receiver.ids())) == len(ids) and left == 0

    try:
        await wait_until(all_recorded, timeout=30, interval=0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()
    assert sorted({r.body["data"]["task_id"] for r in receiver.received}) == sorted(ids)
    assert receiver.rejected == []


def test_secrets_are_standard_webhooks_secrets() -> None:
    from standardwebhooks.webhooks import Webhook

    secret = new_secret()
    assert secret.startswith("whsec_") and secret != new_secret()
    Webhook(secret)  # decodes


def test_a_host_that_is_no_host_name_is_malformed_not_unresolvable() -> None:
    """ "http://exa mple.com/" was a 422 "its host 'exa%20mple.com' does not resolve", where
    the docs make a malformed URL a 400."""
    for url in ("http://exa mple.com/", "http://ex%41mple.com/", "http://a<b>.com/"):
        with pytest.raises(DestinationRefused) as refused:
            parse_destination(url)
        assert "a host name holds no spaces or % escapes" in refused.value.fields[0].message
    assert parse_destination("http://bücher.example/")[1] == "bücher.example"
    assert parse_destination("http://[::1]:8080/")[1:] == ("::1", 8080)
    assert parse_destination("http://my_host.local/")[1] == "my_host.local"
