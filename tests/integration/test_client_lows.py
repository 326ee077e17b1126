"""The client's smaller promises, each found broken by an exploratory tester: its errors
survive pickling (a process pool hung on them), a POST whose answer never came says it may
have been carried out, batch options are checked as submit's are, a naive ``run_at`` is
refused, an empty ``statuses`` retries nothing, and a results path may be a string."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import pickle
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestra.client import (
    ApiError,
    AsyncClient,
    BadRequest,
    Client,
    ClientClosed,
    ClientError,
    Conflict,
    ConnectionFailed,
    NotFound,
    Unprocessable,
    UnsendableValue,
)
from tests.conftest import Service
from tests.fixtures.servers import loopback_server


async def test_the_clients_errors_survive_pickling_with_what_they_carry(service: Service) -> None:
    """A process pool sends a worker's exception back pickled: one that could not be rebuilt
    broke the pool (``BrokenProcessPool``) or hung ``multiprocessing.Pool.get()``."""
    async with AsyncClient(service.url) as client:
        with pytest.raises(NotFound) as missing:
            await client.get_task(999_999)
        with pytest.raises(Unprocessable) as invalid:
            await client.submit("summarize", {"text": 5})
    async with AsyncClient("http://127.0.0.1:9") as nowhere:
        with pytest.raises(ConnectionFailed) as unreached:
            await nowhere.health()
    for raised in (missing.value, invalid.value, unreached.value):
        for again in (pickle.loads(pickle.dumps(raised)), copy.copy(raised)):
            assert type(again) is type(raised)
            assert str(again) == str(raised) and again.args == raised.args
            assert vars(again) == vars(raised)
    assert pickle.loads(pickle.dumps(invalid.value)).field == "params.text"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_post_whose_answer_never_came_may_have_been_carried_out(kind: str) -> None:
    """The request went out and the server (holding it) never answered: the timeout is no
    "cannot reach the server", which a caller takes as safe to send again."""
    heard: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(30)

    async with loopback_server(silent) as url:
        if kind == "async":
            async with AsyncClient(url, timeout=0.3) as client:
                with pytest.raises(ConnectionFailed) as posted:
                    await client.submit("summarize", {"text": "a"})
                with pytest.raises(ConnectionFailed) as read:
                    await client.get_task(1)
        else:
            with Client(url, timeout=0.3) as sync:
                with pytest.raises(ConnectionFailed) as posted:
                    await asyncio.to_thread(sync.submit, "summarize", {"text": "a"})
                with pytest.raises(ConnectionFailed) as read:
                    await asyncio.to_thread(sync.get_task, 1)
    assert heard and heard[0].startswith(b"POST /api/v1/tasks ")
    assert posted.value.broke, posted.value
    assert "may have been carried out" in str(posted.value)
    assert str(posted.value).startswith(f"no answer in time from the server at {url} (")
    assert not read.value.broke and "may have been" not in str(read.value)
    assert str(read.value).startswith(f"no answer in time from the server at {url} (")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_batch_options_are_checked_and_take_a_timedelta(
    kind: str, service: Service, tmp_path: Path
) -> None:
    rows = [{"text": "a"}]
    client: Any = AsyncClient(service.url) if kind == "async" else Client(service.url)

    async def call(name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(client, name)
        if kind == "async":
            return await method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    try:
        with pytest.raises(TypeError, match="unexpected keyword argument 'priorty'"):
            await call("create_batch", "summarize", rows, priorty=9)
        made = await call(
            "create_batch", "summarize", rows, timeout=timedelta(seconds=5), max_attempts=2
        )
        progress = await call("get_batch", made.batch.id)
        assert (progress.batch.timeout, progress.batch.max_attempts) == (5.0, 2)
        # No status named retries nothing: it retried the failed rows (the service's default).
        with pytest.raises(ValueError, match="statuses"):
            await call("retry_batch", made.batch.id, statuses=[])
        # A results path may be a string, as open() takes.
        target = tmp_path / f"results-{kind}.csv"
        await call("save_batch_results", made.batch.id, str(target))
        assert target.read_text().startswith("row,")
        # A row of a type JSON has no form for is named by its number, as a NaN's row is.
        with pytest.raises(TypeError, match="^row 2: "):
            await call("create_batch", "summarize", [{"text": "a"}, {"text": object()}])
    finally:
        await (client.aclose() if kind == "async" else asyncio.to_thread(client.close))


async def test_a_run_at_without_a_time_zone_is_refused_before_sending(service: Service) -> None:
    """The service reads a time without a zone as UTC, and Python a naive datetime as local
    time: 9 hours apart in Tokyo, and the task ran that much late."""
    async with AsyncClient(service.url) as client:
        with pytest.raises(UnsendableValue, match="run_at has no time zone"):
            await client.submit("summarize", {"text": "a"}, run_at=datetime.now())
        listed = [t async for t in client.list_tasks()]
        # The time as RFC 3339 text goes as it did (it raised AttributeError for a while).
        later = await client.submit(
            "summarize",
            {"text": "a"},
            run_at="2030-01-01T00:00:00Z",  # type: ignore[arg-type]
        )
    assert listed == []
    assert later.next_run_at is not None and later.next_run_at.startswith("2030-01-01T00:00:00")


async def test_an_errors_text_says_each_field_once(service: Service) -> None:
    """``str(exc)`` added each field's message again when the message held it in other
    words: "...cannot be read: X; body: X"."""
    async with AsyncClient(service.url) as client:
        with pytest.raises(BadRequest) as unread:
            await client.create_batch("summarize", b"text\ra\rb\r", data_format="csv")
        await client.create_batch("summarize", [{"text": "a"}], idempotency_key="k-1")
        with pytest.raises(Conflict) as reused:
            await client.create_batch(
                "summarize", [{"text": "a"}], idempotency_key="k-1", priority=3
            )
    for raised in (unread.value, reused.value):
        field = raised.fields[0]
        assert str(raised).count(field.message) == 1, str(raised)
        assert field.field in str(raised), str(raised)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_shutting_down_503_is_sent_again_only_when_that_is_safe(kind: str) -> None:
    """The service stopped while the request ran, which may have committed: a submit without
    an idempotency key is not sent again (it could run twice), a read or a keyed submit is."""
    from tests.integration.test_client import Busy, _error

    stopped = (503, {"Retry-After": "1"}, _error(503, "shutting_down"))
    task = b"{}"
    waits: list[float] = []

    async def run(call: str, **options: Any) -> Busy:
        busy = Busy([stopped, (200, {}, task)])
        async with loopback_server(busy) as url:
            if kind == "async":

                async def nap(seconds: float) -> None:
                    waits.append(seconds)

                async with AsyncClient(url, sleep=nap) as client:
                    with contextlib.suppress(ApiError):  # (the second answer is no task)
                        await getattr(client, call)(*options.pop("args"), **options)
            else:
                with Client(url, sleep=waits.append) as sync:
                    with contextlib.suppress(ApiError):  # (the second answer is no task)
                        method = getattr(sync, call)
                        await asyncio.to_thread(method, *options.pop("args"), **options)
        return busy

    plain = await run("submit", args=("summarize", {"text": "a"}))
    keyed = await run("submit", args=("summarize", {"text": "a"}), idempotency_key="once")
    assert len(plain.requests) == 1, plain.requests
    assert len(keyed.requests) == 2, keyed.requests


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_download_cut_midway_says_so(kind: str) -> None:
    """A batch's results cut off while they were read said "cannot reach the server"."""
    body = b"".join(b'{"row": %d, "status": "succeeded"}\n' % i for i in range(50))

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body)
        )
        await writer.drain()
        writer.transport.abort()  # no last chunk: cut off

    rows: list[dict[str, Any]] = []
    async with loopback_server(cut) as url:
        with pytest.raises(ConnectionFailed) as raised:
            if kind == "async":
                async with AsyncClient(url) as client:
                    async for row in client.batch_results(1):
                        rows.append(row)
            else:
                with Client(url) as sync:
                    await asyncio.to_thread(lambda: rows.extend(sync.batch_results(1)))
    assert len(rows) == 50
    assert raised.value.cut and not raised.value.broke
    assert str(raised.value).startswith(f"the answer from the server at {url} was cut off (")


async def test_a_page_size_the_service_would_refuse_is_named_as_the_caller_wrote_it(
    service: Service,
) -> None:
    """``page_size=0`` went out as ``limit=0``, and the service's 400 named ``limit``, a word
    the caller never wrote."""
    async with AsyncClient(service.url) as client:
        with pytest.raises(ValueError, match=r"^page_size must be a whole number from 1 to 500"):
            [t async for t in client.list_tasks(page_size=0)]
        with pytest.raises(ValueError, match=r"from 1 to 500, not 501"):
            await client.list_schedules(page_size=501)
        with pytest.raises(ValueError, match=r"from 1 to 200, not 201"):
            [d async for d in client.webhook_deliveries(1, page_size=201)]

    def with_the_sync_client() -> list[Any]:
        with Client(service.url) as sync:
            with pytest.raises(ValueError, match=r"^page_size must be a whole number"):
                sync.list_webhooks(page_size=-1)
            with pytest.raises(ValueError, match=r"^page_size must be a whole number"):
                list(sync.list_batches(page_size=0))
            return list(sync.list_tasks(page_size=500))  # the largest page goes out

    assert await asyncio.to_thread(with_the_sync_client) == []


#: Set by :func:`_stalled` once a request has been read (from any thread).
_HEARD = threading.Event()


async def _stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that reads the request and never answers (a stalled proxy)."""
    await reader.readuntil(b"\r\n\r\n")
    _HEARD.set()
    await asyncio.sleep(60)


async def test_a_wait_against_a_stalled_server_ends_near_its_timeout() -> None:
    """``wait(id, timeout=2)`` from a client made with ``timeout=1`` took 32 s: the long
    poll's answer was awaited 30 s past its wait (helper-132). It is awaited the client's
    own timeout past it."""
    async with loopback_server(_stalled) as url:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with AsyncClient(url, timeout=1) as client:
            with pytest.raises(ConnectionFailed, match="no answer in time"):
                await client.wait(1, timeout=2)
        assert loop.time() - began < 12  # 2 s of wait, then 5 s at least for its answer


async def test_a_first_poll_whose_connection_times_out_fails_at_once() -> None:
    """A host that drops connections (a firewall, a full backlog) times them out rather than
    refusing them: a client the service never answered waited out the reconnect window
    (80 s) for what is a wrong URL, as a refused one is (helper-132)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # past the backlog: the next connection's SYN is dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            async with AsyncClient(f"http://127.0.0.1:{port}", timeout=1) as client:
                with pytest.raises(ConnectionFailed):
                    await client.wait(1)
            assert loop.time() - began < 10
        finally:
            for filler in fillers:
                filler.close()


async def test_a_full_connection_pool_is_said_so_not_an_unreachable_server() -> None:
    """Past httpx's connections (100; each open event stream holds one), calls failed with
    "cannot reach the server" (helper-132)."""
    import httpx

    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with (
        loopback_server(_stalled) as url,
        AsyncClient(url, timeout=0.5, transport=transport) as client,
    ):

        async def follow() -> None:
            async for _ in client.task_events(1):
                pass

        _HEARD.clear()
        holding = asyncio.create_task(follow())
        await asyncio.to_thread(_HEARD.wait, 10)  # its stream holds the one connection
        with pytest.raises(ConnectionFailed, match="every connection of this client") as full:
            await client.get_task(2)
        assert full.value.pool_full and not full.value.broke
        # A wait took it for the service's outage: tried again for 60 s, then "cannot reach
        # the server" (helper-150). The pool is the client's own: said at once.
        began = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionFailed, match="every connection of this client") as full:
            await client.wait(2)
        assert full.value.pool_full
        assert asyncio.get_running_loop().time() - began < 20  # its poll's own timeout
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionFailed):
            await holding


def test_a_client_closed_while_a_call_is_in_flight_raises_client_closed() -> None:
    """``close()`` from another thread (an app shutting down) while calls were in flight
    raised httpx's RuntimeError, past every ``except ClientError`` (helper-132)."""

    async def serve() -> None:
        async with loopback_server(_stalled) as url:
            ready.put(url)
            await asyncio.to_thread(done.wait, 30)

    import queue

    ready: queue.Queue[str] = queue.Queue()
    done = threading.Event()
    server = threading.Thread(target=asyncio.run, args=(serve(),))
    server.start()
    try:
        client = Client(ready.get(timeout=10), timeout=3)  # (httpx does not cut it short)
        raised: list[BaseException] = []

        def call() -> None:
            try:
                client.get_task(1)
            except BaseException as exc:  # noqa: BLE001 - what it raised, whatever it is
                raised.append(exc)

        _HEARD.clear()
        caller = threading.Thread(target=call)
        caller.start()
        assert _HEARD.wait(10)  # its request is out
        client.close()
        caller.join(20)
        assert len(raised) == 1 and isinstance(raised[0], ClientClosed), raised
    finally:
        done.set()
        server.join(30)


async def test_an_async_client_used_after_its_loop_closed_says_so(service: Service) -> None:
    """Each asyncio.run() on one AsyncClient: every other call raised a bare RuntimeError
    ("Event loop is closed"), past every ``except ClientError`` (helper-150)."""
    aclient = AsyncClient(service.url)

    def runs() -> list[str]:
        outcomes = []
        for _ in range(4):
            try:
                asyncio.run(aclient.list_templates())
                outcomes.append("ok")
            except ClientError as exc:
                outcomes.append(str(exc))
        return outcomes

    outcomes = await asyncio.to_thread(runs)
    assert outcomes[0] == "ok", outcomes
    failures = [o for o in outcomes if o != "ok"]
    assert failures and all("make the client inside the loop" in o for o in failures), outcomes
    await aclient.aclose()
