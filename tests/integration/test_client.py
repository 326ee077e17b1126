"""orchestra.client against a running service: every public method of both clients, the API
key from the environment, 429 and 503 answers tried again after their Retry-After, and the
API's errors as exceptions carrying status, code, field and message."""

from __future__ import annotations

import asyncio
import csv
import gc
import inspect
import json
import math
import re
import warnings
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestra.client import (
    ApiError,
    AsyncClient,
    AuthenticationFailed,
    BadRequest,
    Client,
    ClientClosed,
    ClientError,
    Conflict,
    ConnectionFailed,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    Unavailable,
    Unprocessable,
    UnsendableValue,
)
from orchestra.client.core import retry_after
from orchestra.config import AuthSettings
from orchestra.domain import TaskStatus
from orchestra.errors import OrchestraError
from tests.conftest import Service, StartService, make_keys, make_settings, rows_by_status
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import loopback_server, wait_until
from tests.fixtures.webhook_receiver import Receiver

GREET = "name: greet\nmodel: m\nsteps:\n  - id: a\n    prompt: hi\n"
BAD = "name: bad\nsteps:\n  - id: a\n    prompt: '{{ params.nope }}'\n"


#: Called by the batch test; the other public methods by the test of everything else.
BATCH_METHODS = {
    "create_batch",
    "get_batch",
    "list_batches",
    "cancel_batch",
    "retry_batch",
    "batch_results",
    "save_batch_results",
}


def public_methods(cls: type) -> set[str]:
    return {n for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


class Api:
    """Either client behind one awaitable face (the blocking one runs on a thread, so the
    service in this event loop answers it), recording every method called."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client
        self.called: set[str] = set()

    async def do(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        self.called.add(name)
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncClient):
            return await method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    async def take(self, name: str, /, *args: Any, limit: int | None = None, **kwargs: Any) -> Any:
        """The items an iterator method yields (the first ``limit``), then it is closed."""
        self.called.add(name)
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncClient):
            items: list[Any] = []
            gen = method(*args, **kwargs)
            try:
                async for item in gen:
                    items.append(item)
                    if limit is not None and len(items) >= limit:
                        break
            finally:
                await gen.aclose()
            return items

        def run() -> list[Any]:
            with closing(method(*args, **kwargs)) as gen:
                return list(islice(gen, limit))

        return await asyncio.to_thread(run)


async def open_client(kind: str, url: str, **options: Any) -> Client | AsyncClient:
    return AsyncClient(url, **options) if kind == "async" else Client(url, **options)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver()
    await hooks.start()
    try:
        yield hooks
    finally:
        await hooks.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_every_method_works_against_a_running_service(
    kind: str,
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    receiver: Receiver,
) -> None:
    settings = make_settings(db_url, fake_ollama.url)
    settings = msgspec.structs.replace(
        settings,
        webhooks=msgspec.structs.replace(
            settings.webhooks, allow_private=True, poll_interval=0.2, retry_base_seconds=0.05
        ),
    )
    async with start_service(settings) as svc:
        client = await open_client(kind, svc.url)
        api = Api(client)
        try:
            await _the_service(api)
            await _templates(api)
            hook = await _webhooks_subscribe(api, receiver)
            await _tasks(api)
            await _webhooks_deliveries(api, receiver, hook)
            await _schedules(api)
        finally:
            await api.do("aclose" if kind == "async" else "close")
    cls = AsyncClient if kind == "async" else Client
    assert api.called == public_methods(cls) - BATCH_METHODS, "every public method is called"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_batches_from_a_file_and_from_an_iterable_run_to_their_results(
    kind: str, service: Service, tmp_path: Path
) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("text\nfirst row\nsecond row\nthird row\n")
    client = await open_client(kind, service.url)
    api = Api(client)
    try:
        sent: list[int] = []
        from_file = await api.do("create_batch", "summarize", data, priority=2, on_sent=sent.append)
        assert (from_file.read, from_file.refused, from_file.batch.priority) == (3, 0, 2)
        assert sum(sent) == data.stat().st_size  # what a progress bar hears
        from_rows = await api.do("create_batch", "summarize", iter([{"text": "a"}, {"x": 1}]))
        assert (from_rows.read, from_rows.refused) == (2, 1)
        assert from_rows.problems[0].row == 2
        # A key beyond ASCII goes as UTF-8 (httpx alone refuses it: UnicodeEncodeError).
        keyed = await api.do("create_batch", "summarize", b"text\nk\n", idempotency_key="lot-é")
        resent = await api.do("create_batch", "summarize", b"text\nk\n", idempotency_key="lot-é")
        assert resent.batch.id == keyed.batch.id

        async def done(batch_id: int) -> bool:
            return bool((await api.do("get_batch", batch_id)).progress == 1.0)

        await wait_until(lambda: done(from_file.batch.id), timeout=60, interval=0.2)
        results = await api.take("batch_results", from_file.batch.id)
        assert [r["row"] for r in results] == [1, 2, 3]
        assert [r["status"] for r in results] == ["succeeded"] * 3
        assert "second row" in results[1]["result"]
        await api.do("save_batch_results", from_file.batch.id, tmp_path / "out.jsonl")
        saved = (tmp_path / "out.jsonl").read_text().splitlines()
        assert [json.loads(line)["row"] for line in saved] == [1, 2, 3]
        await api.do("save_batch_results", from_file.batch.id, tmp_path / "out.csv")
        table = list(csv.DictReader((tmp_path / "out.csv").open()))
        assert [(r["row"], r["status"]) for r in table] == [
            (str(n), "succeeded") for n in (1, 2, 3)
        ]
        assert not list(tmp_path.glob("*.part"))
        listed = await api.take("list_batches", page_size=1)
        assert [b.id for b in listed] == [keyed.batch.id, from_rows.batch.id, from_file.batch.id]
        assert listed[2].counts == rows_by_status(succeeded=3)
        assert (listed[2].finished, listed[2].progress) == (3, 1.0)
        assert (await api.do("retry_batch", from_file.batch.id)).changed == 0  # none failed
        both = ("failed", "cancelled")
        assert (await api.do("retry_batch", from_file.batch.id, statuses=both)).changed == 0
        # One status as a plain string is that status, not its letters (a 400 before).
        assert (await api.do("retry_batch", from_file.batch.id, statuses="cancelled")).changed == 0
        assert (await api.do("cancel_batch", from_file.batch.id)).changed == 0  # all done
        with pytest.raises(NotFound):
            await api.do("get_batch", 999)
    finally:
        await api.do("aclose" if kind == "async" else "close")
    assert api.called >= BATCH_METHODS


async def _the_service(api: Api) -> None:
    health = await api.do("health")
    assert health.status in ("ok", "degraded") and health.database == "ok"
    # /api/v1/models had no call, and health() could not ask ?check=now (helper-150).
    checked = await api.do("health", check_now=True)
    assert checked.providers and all(p.checked_at for p in checked.providers.values())
    models = await api.do("models", check_now=True)
    assert models.models and {p.name for p in models.providers} == set(checked.providers)


async def _templates(api: Api) -> None:
    names = {t.name for t in await api.do("list_templates")}
    assert "summarize" in names
    summarize = await api.do("get_template", "summarize")
    assert "text" in summarize.parameters["properties"]
    bad = await api.do("validate_template", BAD)
    assert bad.valid is False and bad.errors[0].message.startswith("unknown parameter 'nope'")
    good = await api.do("validate_template", GREET.encode())
    assert (good.valid, good.name) == (True, "greet")
    made = await api.do("register_template", GREET)
    assert (made.template.name, made.template.version, made.created) == ("greet", 1, True)
    again = await api.do("register_template", GREET)
    assert again.created is False
    await api.do("register_template", GREET.replace("prompt: hi", "prompt: hello"))
    versions = await api.do("template_versions", "greet")
    assert [v.version for v in versions] == [1, 2]
    assert (await api.do("get_template", "greet", 1)).version == 1
    with pytest.raises(Unprocessable) as invalid:
        await api.do("register_template", BAD)
    assert invalid.value.status == 422 and invalid.value.code == "invalid_template"
    assert invalid.value.problems[0].line == 4
    await api.do("delete_template", "greet")
    with pytest.raises(NotFound) as gone:
        await api.do("get_template", "greet")
    assert (gone.value.status, gone.value.code) == (404, "template_not_found")
    assert {t.name for t in await api.do("reload_templates")} == names


async def _tasks(api: Api) -> None:
    task = await api.do("submit", "summarize", {"text": "A client test."}, priority=3)
    assert task.template == "summarize" and task.priority == 3
    events = await api.take("task_events", task.id)
    assert events[0].type == "task.queued" and events[-1].type == "task.finished"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert any(e.type == "step.tokens" and e.data["text"] for e in events)
    done = await api.do("wait", task.id)
    assert done.status == TaskStatus.SUCCEEDED and "A client test." in done.result
    assert (await api.do("get_task", task.id)).result == done.result
    # The events after a given one only.
    assert [e.seq for e in await api.take("task_events", task.id, after=2)][0] == 3

    later = await api.do("submit", "summarize", {"text": "later"}, delay=timedelta(minutes=1))
    assert later.status == TaskStatus.QUEUED and later.next_run_at is not None
    due = datetime.fromisoformat(later.next_run_at) - datetime.fromisoformat(later.created_at)
    assert timedelta(seconds=59) < due <= timedelta(seconds=61)
    waited = await api.do("wait", later.id, timeout=0.2)  # a long poll that runs out
    assert waited.status == TaskStatus.QUEUED
    assert (await api.do("cancel", later.id)).status == TaskStatus.CANCELLED
    with pytest.raises(Conflict) as finished:
        await api.do("cancel", later.id)
    assert (finished.value.status, finished.value.task_status) == (409, "cancelled")
    assert (await api.do("retry", later.id)).status in ("queued", "running", "succeeded")
    assert (await api.do("wait", later.id)).status == TaskStatus.SUCCEEDED

    third = await api.do("submit", "summarize", {"text": "third"}, idempotency_key="k1")
    replay = await api.do("submit", "summarize", {"text": "third"}, idempotency_key="k1")
    assert replay.id == third.id
    await api.do("wait", third.id)

    # Pages of one: the iterator follows next_cursor through all three, newest first.
    listed = await api.take("list_tasks", page_size=1)
    assert [t.id for t in listed] == [third.id, later.id, task.id]
    only = await api.take("list_tasks", template="summarize", status="cancelled")
    assert only == []

    feed = await api.take("events", after=0, limit=4)
    assert [e.id for e in feed] == sorted(e.id for e in feed)
    assert feed[0].task_id == task.id and feed[0].template == "summarize"
    assert feed[0].type == "task.queued"
    finished_only = await api.take("events", after=0, types=["task.finished"], limit=2)
    assert {e.type for e in finished_only} == {"task.finished"}

    with pytest.raises(NotFound) as missing:
        await api.do("get_task", 999)
    assert (missing.value.status, missing.value.code) == (404, "task_not_found")
    with pytest.raises(Unprocessable) as invalid:
        await api.do("submit", "summarize", {"sentences": 99})
    error = invalid.value
    assert (error.status, error.code) == (422, "invalid_params")
    assert {f.field for f in error.fields} == {"params.text", "params.sentences"}
    assert error.field in ("params.text", "params.sentences")
    # str() (what a log line holds) names each field and why, as the message alone did not.
    assert "params.text: is required" in str(error) and "params.sentences:" in str(error)


async def _webhooks_subscribe(api: Api, receiver: Receiver) -> int:
    made = await api.do("create_webhook", receiver.url("/hook"))
    assert made.secret.startswith("whsec_") and made.event_types == ["task.finished"]
    receiver.secrets["/hook"] = made.secret
    with pytest.raises(BadRequest) as bad:
        await api.do("create_webhook", receiver.url("/x"), event_types=["no.such"])
    assert (bad.value.status, bad.value.field) == (400, "event_types[0]")
    # One type as a plain string is that type (it was split into its characters).
    one = await api.do(
        "create_webhook", receiver.url("/one"), event_types="task.started", enabled=False
    )
    assert one.event_types == ["task.started"] and one.enabled is False
    changed = await api.do("update_webhook", one.id, event_types="task.queued")
    assert changed.event_types == ["task.queued"]
    await api.do("delete_webhook", one.id)
    return int(made.id)


async def _webhooks_deliveries(api: Api, receiver: Receiver, hook: int) -> None:
    assert [h.id for h in await api.do("list_webhooks")] == [hook]
    assert (await api.do("get_webhook", hook)).url == receiver.url("/hook")
    assert (await api.do("callback_secret")).startswith("whsec_")
    # Four task.finished: the first task, the second cancelled then done, the third.
    await wait_until(lambda: len(receiver.received) >= 4, timeout=30)
    deliveries = await api.take("webhook_deliveries", hook, page_size=3)
    assert [d.task_id for d in deliveries] == [3, 2, 2, 1]  # newest first, over two pages
    assert all(d.type == "task.finished" for d in deliveries)
    count = len(receiver.received)
    queued = await api.do("redeliver", hook, deliveries[0].id)
    assert (queued.id, queued.status) == (deliveries[0].id, "pending")
    await wait_until(lambda: len(receiver.received) == count + 1, timeout=30)
    assert receiver.received[-1].message_id == deliveries[0].message_id
    paused = await api.do("update_webhook", hook, enabled=False, template="summarize")
    assert (paused.enabled, paused.template) == (False, "summarize")
    cleared = await api.do("update_webhook", hook, template=None)
    assert (cleared.enabled, cleared.template) == (False, None)
    rolled = await api.do("roll_webhook_secret", hook, overlap=60)
    assert rolled.secret.startswith("whsec_") and rolled.secret != receiver.secrets["/hook"]
    assert rolled.previous_secret_until is not None
    await api.do("delete_webhook", hook)
    with pytest.raises(NotFound):
        await api.do("get_webhook", hook)


async def _schedules(api: Api) -> None:
    made = await api.do(
        "create_schedule", name="hourly", template="summarize", every="1h", params={"text": "x"}
    )
    assert (made.name, made.every, made.enabled) == ("hourly", "1h", True)
    assert [s.name for s in await api.do("list_schedules")] == ["hourly"]
    one = await api.do("get_schedule", "hourly")
    assert one.id == made.id and len(one.next_fire_times) == 5
    hourly = await api.do("update_schedule", made.id, every=timedelta(hours=1, minutes=30))
    assert hourly.every == "1h30m"
    paused = await api.do("update_schedule", made.id, enabled=False)
    assert paused.enabled is False and paused.next_fire_at is None
    ran = await api.do("run_schedule", "hourly")  # paused or not: its task now
    assert ran.template == "summarize" and ran.params["text"] == "x"
    with pytest.raises(BadRequest) as bad:
        await api.do("update_schedule", "hourly", cron="61 * * * *")
    assert (bad.value.status, bad.value.field) == (400, "cron")
    await api.do("delete_schedule", "hourly")
    with pytest.raises(NotFound):
        await api.do("get_schedule", "hourly")


# -- retries ---------------------------------------------------------------------------------


def _answer(status: int, headers: dict[str, str], body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    reason = {200: "OK", 429: "Too Many Requests", 503: "Service Unavailable"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{head}\r\n"
    ).encode() + body


class Busy:
    """A small HTTP server that answers from a script: 429s and 503s with Retry-After, then
    the real answer; it keeps each request's head."""

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.script = script
        self.requests: list[str] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head.decode("latin-1"))
        status, headers, body = self.script[min(len(self.requests), len(self.script)) - 1]
        writer.write(_answer(status, headers, body))


def _error(status: int, code: str) -> bytes:
    return json.dumps(
        {"status": status, "code": code, "message": "slow down", "fields": []}
    ).encode()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_429_and_503_are_tried_again_after_their_retry_after(kind: str) -> None:
    later = format_datetime(datetime(2999, 1, 1, tzinfo=UTC), usegmt=True)
    busy = Busy(
        [
            (429, {"Retry-After": "2"}, _error(429, "rate_limited")),
            (503, {"Retry-After": "1"}, _error(503, "storage_locked")),
            (503, {"Retry-After": later}, _error(503, "storage_locked")),  # capped at max_wait
            (503, {}, _error(503, "storage_locked")),  # no Retry-After: the backoff
            (200, {}, b'{"items": []}'),
        ]
    )
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(attempts=5, max_wait=7.0, backoff=0.25)
    async with loopback_server(busy) as url:
        options = {"api_key": "k", "retry": policy}
        if kind == "async":
            async with AsyncClient(url, sleep=async_sleep, **options) as aclient:
                assert await aclient.list_templates() == []
        else:
            with Client(url, sleep=sleep, **options) as client:
                assert await asyncio.to_thread(client.list_templates) == []
    assert waits == [2.0, 1.0, 7.0, 0.25 * 2**3]
    assert len(busy.requests) == 5
    assert all("\r\nauthorization: bearer k\r\n" in r.lower() for r in busy.requests)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_after_its_last_try_the_client_raises_with_the_wait_asked(kind: str) -> None:
    busy = Busy([(503, {"Retry-After": "3"}, _error(503, "storage_unavailable"))])
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    async with loopback_server(busy) as url:
        if kind == "async":
            async with AsyncClient(url, sleep=async_sleep, retry=RetryPolicy(attempts=3)) as c:
                with pytest.raises(Unavailable) as raised:
                    await c.get_task(1)
        else:
            with Client(url, sleep=waits.append, retry=RetryPolicy(attempts=3)) as client:
                with pytest.raises(Unavailable) as raised:
                    await asyncio.to_thread(client.get_task, 1)
    assert waits == [3.0, 3.0] and len(busy.requests) == 3
    error = raised.value
    assert (error.status, error.code, error.retry_after) == (503, "storage_unavailable", 3.0)
    assert error.message == "slow down"


async def test_the_services_rate_limit_is_waited_out_as_it_says(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    settings = msgspec.structs.replace(
        make_settings(db_url, fake_ollama.url), auth=AuthSettings(rate_limit_per_minute=2)
    )
    waits: list[float] = []
    async with start_service(settings) as svc:
        with Client(svc.url, sleep=waits.append, retry=RetryPolicy(attempts=2)) as client:

            def three() -> None:
                client.list_templates()
                client.list_templates()
                client.list_templates()

            with pytest.raises(RateLimited) as limited:
                await asyncio.to_thread(three)
    assert limited.value.status == 429 and limited.value.code == "rate_limited"
    # The service said how long (RateLimit-Reset: the rest of its minute); the client waited
    # that once (at most the policy's max_wait), then tried again and stopped.
    assert len(waits) == 1 and 0 < waits[0] <= RetryPolicy().max_wait
    assert limited.value.retry_after is not None and limited.value.retry_after > 0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("5", now) == 5.0
    assert retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert retry_after("soon", now) is None and retry_after(None, now) is None


# -- keys, addresses, failures ---------------------------------------------------------------


async def test_the_key_and_the_url_come_from_the_environment(
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = await make_keys(db_url, "read", "submit")
    async with start_service(make_settings(db_url, fake_ollama.url)) as svc:
        monkeypatch.setenv("ORCHESTRA_URL", svc.url + "/")
        monkeypatch.setenv("ORCHESTRA_API_KEY", tokens["submit"])
        async with AsyncClient() as client:
            assert client.url == svc.url
            task = await client.submit("summarize", {"text": "keyed"})
            assert (await client.wait(task.id)).status == TaskStatus.SUCCEEDED
        monkeypatch.setenv("ORCHESTRA_API_KEY", tokens["read"])
        async with AsyncClient() as client:
            assert (await client.get_task(task.id)).id == task.id
            with pytest.raises(PermissionDenied) as denied:
                await client.cancel(task.id)
            assert (denied.value.status, denied.value.code) == (403, "forbidden")
        monkeypatch.delenv("ORCHESTRA_API_KEY")
        async with AsyncClient() as client:
            with pytest.raises(AuthenticationFailed) as refused:
                await client.get_task(task.id)
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        async with AsyncClient(api_key="orc_wrong") as client:
            with pytest.raises(AuthenticationFailed):
                await client.list_templates()


async def test_nothing_listening_is_a_connection_failure_in_the_error_tree() -> None:
    with Client("http://127.0.0.1:9") as client:
        with pytest.raises(ConnectionFailed) as failed:
            await asyncio.to_thread(client.health)
    assert isinstance(failed.value, OrchestraError)
    assert failed.value.url == "http://127.0.0.1:9"
    assert "cannot reach the server at http://127.0.0.1:9" in str(failed.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("stream", ["task_events", "events"])
async def test_an_event_stream_that_falls_silent_fails_instead_of_hanging(
    kind: str, stream: str
) -> None:
    """A server that opens a stream and then says nothing more (frozen, or a half-open
    connection) is given up on once the stream has been silent for ``stream_timeout``."""

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        beat = b": heartbeat\r\n\r\n"
        writer.write(b"%x\r\n%s\r\n" % (len(beat), beat))
        await writer.drain()
        await reader.read()  # until the client hangs up

    loop = asyncio.get_running_loop()
    async with loopback_server(frozen) as url:
        started = loop.time()
        with pytest.raises(ConnectionFailed) as failed:
            if kind == "async":
                async with AsyncClient(url, stream_timeout=0.5) as aclient:
                    events = aclient.task_events(1) if stream == "task_events" else aclient.events()
                    async for _ in events:
                        pass
            else:
                with Client(url, stream_timeout=0.5) as client:
                    events = client.task_events(1) if stream == "task_events" else client.events()
                    await asyncio.to_thread(list, events)
    assert loop.time() - started < 10
    assert "ReadTimeout" in str(failed.value) or "timed out" in str(failed.value)


async def test_a_closed_client_says_so_in_the_error_tree() -> None:
    """httpx's own RuntimeError, before."""
    client = Client("http://127.0.0.1:9")
    client.close()
    with pytest.raises(ClientClosed) as closed:
        client.health()
    assert isinstance(closed.value, ClientError) and "closed" in str(closed.value)
    assert "``" not in str(closed.value)  # plain text, not the docstring's markup
    async with AsyncClient("http://127.0.0.1:9") as aclient:
        pass
    with pytest.raises(ClientClosed):
        await aclient.list_templates()


async def test_a_dataset_file_of_an_unknown_format_is_refused_before_sending(
    tmp_path: Path,
) -> None:
    """A .txt holding CSV was sent as JSON lines, and every row refused as "not JSON"."""
    data = tmp_path / "articles.txt"
    data.write_text("text\nhello\n")
    with Client("http://127.0.0.1:9") as client:  # nothing listens: nothing may be sent
        with pytest.raises(ValueError, match="pass data_format='csv' or 'jsonl'"):
            client.create_batch("summarize", data)
    async with AsyncClient("http://127.0.0.1:9") as aclient:
        with pytest.raises(ValueError, match="'.txt' is not known"):
            await aclient.create_batch("summarize", data)


async def test_a_page_that_is_not_the_apis_is_an_error_with_its_status() -> None:
    async def proxy_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"<html>bad gateway</html>"
        writer.write(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )

    async with loopback_server(proxy_page) as url, AsyncClient(url) as client:
        with pytest.raises(ApiError) as raised:
            await client.list_schedules()
    assert raised.value.status == 502 and raised.value.code == "http_error"
    assert raised.value.message == "502 Bad Gateway (an HTML page, not Orchestra's JSON error)"


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"n": float("nan")}, "params.n is nan, which JSON cannot carry"),
        ({"deep": {"list": [1, float("inf")]}}, r"params.deep.list\[1\] is inf"),
        ({"range": (0.0, float("nan"))}, r"params.range\[1\] is nan"),
        ({"pair": ("ok", b"x")}, r"params.pair\[1\] is bytes"),
        ({"n": -float("inf")}, "params.n is -inf"),
        ({"blob": b"\x00\x01"}, "params.blob is bytes, which JSON cannot carry"),
        ({"text": "ok \ud800 no"}, r"params.text holds a lone surrogate \('\\ud800' at 3\)"),
        ({"bad \udfff key": 1}, "params holds a key with a lone surrogate"),
    ],
)
async def test_values_json_cannot_carry_are_refused_before_sending(
    params: dict[str, Any], said: str
) -> None:
    """msgspec wrote NaN and infinity as null and bytes as base64 (so a NaN arrived as "null
    is not of type 'number'", or not at all where a parameter is optional), and a lone
    surrogate raised a bare UnicodeEncodeError. Nothing listens on port 9: a request sent
    would be a ConnectionFailed, not the ValueError."""
    with Client("http://127.0.0.1:9") as client:
        with pytest.raises(ValueError, match=said):
            client.submit("summarize", params)
        with pytest.raises(ValueError, match=said):
            client.create_schedule(
                name="nightly", template="summarize", cron="0 3 * * *", params=params
            )
    async with AsyncClient("http://127.0.0.1:9") as aclient:
        with pytest.raises(ValueError, match=said):
            await aclient.submit("summarize", params)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_batch_row_json_cannot_carry_is_refused_before_anything_is_sent(
    kind: str, service: Service
) -> None:
    """Rows were encoded as they were sent: the third row's surrogate broke the upload after
    the first two were read, and the service kept them in a batch whose id the caller never
    learnt. Now every row is encoded (and checked) before the upload starts."""
    client = await open_client(kind, service.url)
    api = Api(client)
    rows = [{"text": "one"}, {"text": "two"}, {"text": "bad \ud800"}, {"text": "four"}]
    try:
        with pytest.raises(ValueError, match=r"row 3: text holds a lone surrogate"):
            await api.do("create_batch", "summarize", iter(rows))
        with pytest.raises(ValueError, match=r"row 2: sentences is nan"):
            await api.do("create_batch", "summarize", [{"text": "a"}, {"sentences": math.nan}])
        assert await api.take("list_batches") == []
        # Rows from an iterable are now kept until sent, so with a key they are resent too.
        good = await api.do("create_batch", "summarize", iter(rows[:2]), idempotency_key="k")
        assert (good.read, good.refused) == (2, 0)
    finally:
        await api.do("aclose" if kind == "async" else "close")


async def test_an_upload_without_a_key_is_not_sent_again_after_a_503() -> None:
    """The service keeps the rows it read before a 503 (its message names the batch): sent
    again, they were queued twice. With a key, the second sending resumes the batch."""
    seen: list[bytes] = []

    async def locked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        size = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(size)
        body = b'{"status":503,"code":"storage_locked","message":"the database is busy"}'
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 0\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    async with loopback_server(locked) as url:
        async with AsyncClient(url, retry=RetryPolicy(attempts=3, backoff=0)) as client:
            with pytest.raises(Unavailable):
                await client.create_batch("summarize", b"text\na\n")
            assert len(seen) == 1
            with pytest.raises(Unavailable):
                await client.create_batch("summarize", b"text\na\n", idempotency_key="k")
            assert len(seen) == 1 + 3


async def test_the_rows_of_an_upload_are_dropped_once_it_is_sent(service: Service) -> None:
    """The rows were kept in a temporary file that was never closed (a ResourceWarning, and
    an open file past 8 MiB until the garbage collector came)."""

    def upload() -> None:
        with Client(service.url) as client:
            client.create_batch("summarize", ({"text": str(n)} for n in range(3)))
            with pytest.raises(UnsendableValue):
                client.create_batch("summarize", [{"text": "a"}, {"text": math.nan}])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await asyncio.to_thread(upload)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught


@pytest.mark.parametrize(
    ("body", "kind", "said"),
    [
        (b"<html><body>Sign in</body></html>", b"text/html", "200 OK (an HTML page"),
        (b'{"items": "nope"}', b"application/json", "Expected `array`, got `str`"),
        # A service of another version (a field missing): said so, without its data.
        (b'{"items": [{"name": "private"}]}', b"application/json", "of another version?"),
    ],
)
async def test_a_success_that_is_not_the_apis_answer_is_an_error_in_the_tree(
    body: bytes, kind: bytes, said: str
) -> None:
    """A proxy's login page answered 200: msgspec's DecodeError or ValidationError came out
    of the client raw (a traceback in the CLI)."""

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (kind, len(body), body)
        )
        await writer.drain()
        writer.close()

    async with loopback_server(other) as url, AsyncClient(url) as client:
        with pytest.raises(ApiError) as raised:
            await client.list_templates()
    assert raised.value.code == "http_error" and said in raised.value.message, raised.value
    assert "private" not in raised.value.message


@pytest.mark.parametrize(
    "data", [b'{"time": "t", "type": "task.queued"}', b"[1, 2]", b"{not json", b'{"seq": "x"}']
)
async def test_an_event_the_client_cannot_read_is_an_error_in_the_tree(data: bytes) -> None:
    """A stream's event of another shape (a service of another version) was a KeyError, a
    JSONDecodeError or a TypeError, past every ``except ClientError`` (helper-132)."""

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Connection: close\r\n\r\nid: 1\nevent: task.queued\ndata: %s\n\n" % data
        )
        await writer.drain()
        writer.close()

    async with loopback_server(other) as url, AsyncClient(url) as client:
        with pytest.raises(ApiError, match="an event this client cannot read"):
            async for _ in client.task_events(1):
                pass


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"x": {b"k": 1}}, r"params.x holds a key JSON cannot carry \(b'k'\)"),
        ({"x": {math.nan: 1}}, r"params.x holds a key JSON cannot carry \(nan\)"),
        ({"d": Decimal("NaN")}, r"params.d is Decimal\('NaN'\)"),
    ],
)
async def test_keys_and_decimals_json_cannot_carry_are_refused_too(
    params: dict[str, Any], said: str
) -> None:
    """A bytes key went as base64 text, a NaN key as "nan", a Decimal NaN as "NaN"."""
    with Client("http://127.0.0.1:9") as client:
        with pytest.raises(UnsendableValue, match=said):
            client.submit("summarize", params)


async def test_a_decimal_goes_as_a_number_and_rows_of_the_wrong_kind_are_refused(
    service: Service,
) -> None:
    """Decimal("2") for an integer went as the string "2" (refused as not an integer); a str
    given as rows made a batch of one invalid row per character."""

    def run() -> None:
        with Client(service.url) as client:
            task = client.submit("summarize", {"text": "t", "sentences": Decimal("2")})
            assert task.params["sentences"] == 2
            for rows in ('{"text": "q"}\n', bytearray(b"text\nq\n"), {"text": "q"}):
                with pytest.raises(TypeError, match="rows must be a Path, bytes or an iterable"):
                    client.create_batch("summarize", rows)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="row 2 is a str, not a dict of params"):
                client.create_batch("summarize", [{"text": "q"}, "text"])  # type: ignore[list-item]
            assert client.list_batches() is not None and not list(client.list_batches())

    await asyncio.to_thread(run)


async def test_a_connection_that_breaks_after_a_post_went_out_says_it_may_have_been_done() -> None:
    """A service killed mid-upload: the caller read "cannot reach the server", though the
    service had read (and kept) part of it."""

    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # gone without an answer (a reset)

    async with loopback_server(dies) as url, AsyncClient(url) as client:
        with pytest.raises(ConnectionFailed) as raised:
            await client.create_batch("summarize", [{"text": "a"}])
        assert raised.value.broke and "may have been carried out" in str(raised.value)
        with pytest.raises(ConnectionFailed) as read:
            await client.list_batches().__anext__()
        assert not read.value.broke and "cannot reach the server" in str(read.value)
