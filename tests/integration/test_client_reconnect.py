"""An event stream followed while the service restarts: the client opens it again after the
last event it saw, so its follower sees every event once, to the task's finish (docs/events.md
promises the resume; the client used to die with "incomplete chunked read"). A ``wait`` polls
again through the restart as well (it died with ConnectionFailed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from asyncio import FIRST_COMPLETED
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestra.client import (
    AsyncClient,
    AuthenticationFailed,
    Client,
    ConnectionFailed,
    NotFound,
    ReconnectPolicy,
)
from orchestra.wire.events import FeedEvent, TaskEvent
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import (
    free_port,
    loopback_server,
    start_process,
    wait_until,
    write_config,
)

MODEL = "llama3.2"


async def _cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "ORCHESTRA_API_KEY"},
    )


async def _lines(proc: asyncio.subprocess.Process, into: list[str]) -> None:
    """Each line the process writes to stdout, as it writes it."""
    assert proc.stdout is not None
    async for line in proc.stdout:
        into.append(line.decode())


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM: the service's graceful stop (it hands its running task back)."""
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_followers_of_a_task_see_every_event_once_across_a_restart_of_the_service(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "o.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, shutdown_grace=1)
    fake_ollama.close_gate(MODEL)  # the task's model call waits until the restart
    first = await start_process(config)
    second: asyncio.subprocess.Process | None = None
    cli: list[asyncio.subprocess.Process] = []
    try:
        text = "text=Across a restart."
        cli.append(await _cli("submit", "summarize", "-p", text, "--wait", "--url", url))
        await wait_until(lambda: fake_ollama.held(MODEL) == 1, timeout=30)
        async with httpx.AsyncClient(base_url=url) as http:
            [listed] = (await http.get("/api/v1/tasks")).json()["items"]
        task_id = listed["id"]

        # Three more followers: the CLI's `tasks events`, the asyncio client's task_events
        # and the blocking client's all-tasks feed.
        events_cli = await _cli("tasks", "events", str(task_id), "--json", "--url", url)
        cli.append(events_cli)
        printed: list[str] = []
        printing = asyncio.ensure_future(_lines(events_cli, printed))
        followed: list[TaskEvent] = []
        fed: list[FeedEvent] = []

        async def follow_task() -> None:
            async with AsyncClient(url) as client:
                async for event in client.task_events(task_id):
                    followed.append(event)

        def follow_feed() -> None:
            with Client(url) as client:
                for event in client.events(after=0):
                    fed.append(event)
                    if event.type == "task.finished":
                        return

        following = asyncio.ensure_future(follow_task())
        feeding = asyncio.ensure_future(asyncio.to_thread(follow_feed))

        # And two waiters, long-polling when the service stops under them (each has read the
        # task first, as after a submit, so a first poll the stop refuses is tried again).
        ready: list[str] = []

        async def wait_async() -> str:
            async with AsyncClient(url) as client:
                await client.get_task(task_id)
                ready.append("async")
                return (await client.wait(task_id)).status

        def wait_sync() -> str:
            with Client(url) as client:
                client.get_task(task_id)
                ready.append("sync")
                return client.wait(task_id).status

        waiting = asyncio.ensure_future(asyncio.gather(wait_async(), asyncio.to_thread(wait_sync)))

        def started(types: list[str]) -> bool:
            return "step.started" in types

        await wait_until(
            lambda: (
                started([e.type for e in followed])
                and started([e.type for e in fed])
                and started([json.loads(line)["type"] for line in printed])
                and len(ready) == 2
            ),
            timeout=30,
        )

        await _stop(first)  # the streams are cut; the task is handed back
        fake_ollama.open_gate(MODEL)
        second = await start_process(config)  # the same port and database

        await asyncio.wait_for(asyncio.gather(following, feeding, printing), timeout=90)
        waited = await asyncio.wait_for(waiting, timeout=90)
        outs = [await _finished(proc) for proc in cli]
    finally:
        for proc in (first, second, *cli):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()

    (submit_code, submit_out, submit_err), (events_code, _, events_err) = outs
    assert waited == ["succeeded", "succeeded"]  # a wait outlasts the restart, as a stream
    assert submit_code == 0, submit_err
    assert "[attempt 1 handed back: its service stopped; it runs again]" in submit_err
    assert "ECHO:" in submit_out and "Across a restart." in submit_out
    assert events_code == 0, events_err

    seen = [json.loads(line) for line in printed]
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seqs) + 1)), "no event repeated or lost"
    types = [e["type"] for e in seen]
    assert "task.handed_back" in types and types.count("task.started") == 2, types
    assert types[-1] == "task.finished" and seen[-1]["data"]["status"] == "succeeded"

    assert [(e.seq, e.type) for e in followed] == [(e["seq"], e["type"]) for e in seen]
    assert [e.id for e in fed] == sorted({e.id for e in fed}), "the feed: none twice"
    assert [(e.seq, e.type) for e in fed if e.task_id == task_id] == [
        (e.seq, e.type) for e in followed
    ]


async def test_a_wait_begun_while_the_service_restarts_waits_it_out(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    """A client the service has answered (a submit, a read) and whose wait starts while the
    service is down: its first poll is refused, and it is tried again until the service is
    back, not taken for a wrong URL (it failed at once with ConnectionFailed)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "o.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, shutdown_grace=1)
    fake_ollama.close_gate(MODEL)
    first = await start_process(config)
    second: asyncio.subprocess.Process | None = None
    try:
        with Client(url) as client:
            task_id = client.submit("summarize", {"text": "Begun while down."}).id
        await wait_until(lambda: fake_ollama.held(MODEL) == 1, timeout=30)
        loop = asyncio.get_running_loop()
        refused = [asyncio.Event(), asyncio.Event()]  # the sync and the async client's

        def sync_sleep(seconds: float) -> None:
            loop.call_soon_threadsafe(refused[0].set)
            time.sleep(seconds)

        async def async_sleep(seconds: float) -> None:
            refused[1].set()
            await asyncio.sleep(seconds)

        sync_client = Client(url, sleep=sync_sleep)
        async_client = AsyncClient(url, sleep=async_sleep)
        try:
            for task in (sync_client.get_task(task_id), await async_client.get_task(task_id)):
                assert task.status == "running"
            await _stop(first)
            waiting = asyncio.gather(
                asyncio.to_thread(sync_client.wait, task_id), async_client.wait(task_id)
            )
            # Both first polls were refused, and each waits to poll again (a wait that
            # gave up instead ends here with its ConnectionFailed).
            both = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in refused)))
            await asyncio.wait({both, waiting}, timeout=30, return_when=FIRST_COMPLETED)
            if waiting.done():
                waiting.result()
            assert both.done()
            fake_ollama.open_gate(MODEL)
            second = await start_process(config)
            waited = await asyncio.wait_for(waiting, timeout=90)
        finally:
            sync_client.close()
            await async_client.aclose()
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [t.status for t in waited] == ["succeeded", "succeeded"]


async def _finished(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """A CLI's exit code, the rest of its stdout, and its stderr."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _sse_answer(*events: tuple[int, str], end: bool, stopping: bool = False) -> bytes:
    """A 200 event stream of ``events`` (seq, type), ended with its last chunk or not; with
    ``stopping``, it ends as a stopping service ends it ("retry:", come back)."""
    body = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    frames = []
    for seq, kind in events:
        data = json.dumps({"seq": seq, "time": "t", "type": kind}).encode()
        frames.append(b"id: %d\r\nevent: %s\r\ndata: %s\r\n\r\n" % (seq, kind.encode(), data))
    if stopping:
        frames.append(b"retry: 1000\r\n\r\n")
    for frame in frames:
        body += b"%x\r\n%s\r\n" % (len(frame), frame)
    return body + (b"0\r\n\r\n" if end else b"")


def _task_answer(status: str) -> bytes:
    """A 200 answer to GET /api/v1/tasks/1: the task, in ``status``."""
    task = {
        "id": 1,
        "template": "t",
        "template_version": 1,
        "status": status,
        "params": {},
        "model": None,
        "priority": 0,
        "result": None,
        "error": None,
        "steps": [],
        "usage": None,
        "attempts": [],
        "max_attempts": 1,
        "timeout": None,
        "idempotency_key": None,
        "created_at": "2026-12-06T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "next_run_at": None,
    }
    body = json.dumps(task).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


async def _follow(kind: str, url: str, policy: ReconnectPolicy, after: int = 0) -> list[int]:
    """The seqs of task 1's events a client of ``kind`` follows (appended as they come, so
    that those before a failure are kept in ``seen``)."""
    seen: list[int] = []
    if kind == "async":
        async with AsyncClient(url, reconnect=policy) as aclient:
            async for event in aclient.task_events(1, after):
                seen.append(event.seq)
        return seen
    with Client(url, reconnect=policy) as client:
        await asyncio.to_thread(lambda: seen.extend(e.seq for e in client.task_events(1, after)))
    return seen


def _scripted(answers: list[bytes], asked: list[str]) -> Any:
    """A server answering its n-th request with ``answers[n]`` (then cutting the connection:
    an answer without its last chunk is cut), noting each request's target in ``asked``."""

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        asked.append(head.split()[1].decode())
        writer.write(answers[len(asked) - 1])
        await writer.drain()
        writer.transport.abort()

    return scripted


QUICK = ReconnectPolicy(window=0.5, backoff=0.05, max_wait=0.1)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_stream_resumes_after_its_last_event_through_cuts_and_a_503(kind: str) -> None:
    """Cut mid-stream, then a 503 (a proxy while the service starts), then ended cleanly
    before task.finished (a proxy's idle cut), then the rest: each new connection asks for
    the events after the last one seen."""
    asked: list[str] = []
    answers = [
        _sse_answer((1, "task.queued"), (2, "task.started"), end=False),
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n",
        _sse_answer((3, "step.started"), end=True),
        _sse_answer((4, "step.finished"), (5, "task.finished"), end=True),
    ]

    scripted = _scripted(answers, asked)

    async with loopback_server(scripted) as url:
        seen = await _follow(kind, url, ReconnectPolicy(window=30, backoff=0.01, max_wait=0.05))
    assert seen == [1, 2, 3, 4, 5]
    events = "/api/v1/tasks/1/events"
    # The 503 is tried again by the retry policy (Retry-After: 0), with the same after.
    assert asked == [events, f"{events}?after=2", f"{events}?after=2", f"{events}?after=3"]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_stream_that_stays_down_fails_after_the_reconnect_window(kind: str) -> None:
    """A service that cuts the stream after one event and then resets every connection: the
    follower tries again for the policy's window, then raises ConnectionFailed."""
    tries = 0

    async def cut_then_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tries
        await reader.readuntil(b"\r\n\r\n")
        tries += 1
        if tries == 1:
            writer.write(_sse_answer((1, "task.queued"), end=False))
            await writer.drain()
        writer.transport.abort()  # as a service going down: the connection is reset

    async with loopback_server(cut_then_down) as url:
        with pytest.raises(ConnectionFailed) as failed:
            await _follow(kind, url, QUICK)
    assert tries > 2
    assert "could not be resumed within 0.5 s" in str(failed.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_what_is_not_a_drop_fails_at_once(kind: str) -> None:
    """A 404 on reconnecting (the task is gone) is raised; a stream that ends cleanly without
    an event (``after`` past the task's last event) is the end once the task is asked and
    has finished; with a window of 0 a cut is raised as it happens."""
    gone = b'{"code":"task_not_found","message":"no task with id 1"}'
    answers = [
        _sse_answer((1, "task.queued"), end=False),
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(gone), gone),
    ]

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split()[1] == b"/api/v1/tasks/1":
            writer.write(_task_answer("succeeded"))
        else:
            writer.write(answers.pop(0) if answers else _sse_answer(end=True))
        await writer.drain()
        writer.transport.abort()

    async with loopback_server(scripted) as url:
        with pytest.raises(NotFound):
            await _follow(kind, url, QUICK)
        assert await _follow(kind, url, QUICK, after=9) == []  # ended: no reconnect
        answers.append(_sse_answer((1, "task.queued"), end=False))
        with pytest.raises(ConnectionFailed) as cut:
            await _follow(kind, url, ReconnectPolicy(window=0))
    assert "incomplete chunked read" in str(cut.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_stream_a_stopping_service_ended_without_an_event_is_resumed(kind: str) -> None:
    """A rolling deploy: the stream resumed on another process, the task stayed quiet, and
    that process stopped too. Its answer carried no event but said "come back" (retry:): it
    is not the end of the task's stream (that is only task.finished, or an answer without
    an event that says nothing more)."""
    asked: list[str] = []
    answers = [
        _sse_answer((1, "task.queued"), (2, "task.started"), end=True, stopping=True),
        _sse_answer(end=True, stopping=True),
        _sse_answer((3, "task.finished"), end=True),
    ]

    scripted = _scripted(answers, asked)

    async with loopback_server(scripted) as url:
        seen = await _follow(kind, url, ReconnectPolicy(window=30, backoff=0.01, max_wait=0.05))
    assert seen == [1, 2, 3]
    events = "/api/v1/tasks/1/events"
    assert asked == [events, f"{events}?after=2", f"{events}?after=2"]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_quiet_stream_a_proxy_ended_cleanly_is_resumed_while_the_task_runs(
    kind: str,
) -> None:
    """A proxy that ends streams after a while ended one cleanly after its keep-alives alone:
    the follower took that for the end, and ``task_events`` (and ``orchestra tasks events``)
    ended, exit 0, on a task still queued. The task is asked: running, so resumed; and a
    401 there (a key revoked meanwhile, whose stream the service ends so) is raised."""
    asked: list[str] = []
    keep_alive = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    keep_alive += b"%x\r\n%s\r\n0\r\n\r\n" % (len(b": keep-alive\n\n"), b": keep-alive\n\n")
    answers = [
        _sse_answer((1, "task.queued"), end=True),  # a proxy's cut, after an event
        keep_alive,  # a proxy's cut, after keep-alives alone
        _task_answer("queued"),
        _sse_answer((2, "task.started"), (3, "task.finished"), end=True),
    ]

    scripted = _scripted(answers, asked)

    async with loopback_server(scripted) as url:
        seen = await _follow(kind, url, ReconnectPolicy(window=30, backoff=0.01, max_wait=0.05))
    assert seen == [1, 2, 3]
    events = "/api/v1/tasks/1/events"
    assert asked == [events, f"{events}?after=1", "/api/v1/tasks/1", f"{events}?after=1"]

    # The task finished after the quiet answer ended: it is opened once more, for the last
    # events (the follower returned without them, task.finished among them).
    answers[2] = _task_answer("succeeded")
    asked.clear()
    async with loopback_server(scripted) as url:
        seen = await _follow(kind, url, ReconnectPolicy(window=30, backoff=0.01, max_wait=0.05))
    assert seen == [1, 2, 3]
    assert asked == [events, f"{events}?after=1", "/api/v1/tasks/1", f"{events}?after=1"]

    revoked = b'{"status":401,"code":"unauthorized","message":"the API key is not valid"}'
    answers[2] = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n" + (
        b"Content-Length: %d\r\n\r\n%s" % (len(revoked), revoked)
    )
    asked.clear()
    async with loopback_server(scripted) as url:
        with pytest.raises(AuthenticationFailed):
            await _follow(kind, url, ReconnectPolicy(window=30, backoff=0.01, max_wait=0.05))


async def _wait(kind: str, url: str, timeout: float | None = None) -> None:
    if kind == "async":
        async with AsyncClient(url) as aclient:
            await aclient.wait(1, timeout=timeout)
    else:
        with Client(url) as client:
            await asyncio.to_thread(client.wait, 1, timeout)


# The reconnect window is 60 s: a wait that waited it out would hit these tests' timeouts.


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_wait_for_a_service_that_is_not_there_fails_at_once(kind: str) -> None:
    """Only a poll cut off, or one after an answer, is tried again: a wait whose first poll
    cannot connect (a wrong URL) fails without waiting out the reconnect window."""
    with pytest.raises(ConnectionFailed):
        await _wait(kind, f"http://127.0.0.1:{free_port()}")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_wait_with_a_timeout_gives_up_at_it_while_the_service_is_down(kind: str) -> None:
    """Polls cut off again and again (the service going down under them) are tried again,
    but not past the wait's own timeout: the task cannot be read, so the failure is raised."""
    polls = 0

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal polls
        await reader.readuntil(b"\r\n\r\n")
        polls += 1
        writer.transport.abort()

    async with loopback_server(cut) as url:
        with pytest.raises(ConnectionFailed):
            await _wait(kind, url, timeout=1.0)
    assert polls >= 2  # tried again meanwhile


async def test_a_waiting_submit_says_when_its_attempt_was_lost_mid_text(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    """The service killed while a step's text streamed to ``submit --wait``: the new
    attempt's text ran on from the old one's last word (``…word39ECHO: …``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "o.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url)
    fake_ollama.reply = lambda request: " ".join(f"word{i}" for i in range(400))
    fake_ollama.word_delay = 0.02  # 8 s of text: the kill comes in its middle
    first = await start_process(config)
    second: asyncio.subprocess.Process | None = None
    submit = await _cli("submit", "summarize", "-p", "text=Lost.", "--wait", "--url", url)
    try:
        said = b""
        assert submit.stderr is not None

        async def text_streamed() -> bool:
            nonlocal said
            try:
                said += await asyncio.wait_for(submit.stderr.read(4096), timeout=0.2)
            except TimeoutError:
                pass
            return b"word3" in said

        await wait_until(text_streamed, timeout=30)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        fake_ollama.word_delay = 0.0
        second = await start_process(config)  # takes the dead process's task back at once
        out, rest = await asyncio.wait_for(submit.communicate(), timeout=90)
    finally:
        for proc in (first, second, submit):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
    err = (said + rest).decode()
    assert submit.returncode == 0, err
    lost = "\n[attempt 1 lost: its worker stopped answering]\n"
    assert lost in err, err
    assert err.index(lost) < err.index("word0", err.index(lost)), err  # the new text after it
