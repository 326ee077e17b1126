"""A request whose connection broke after it went out, before its answer came (the process
that had it was killed, one of several; a kept-alive connection it had closed): the client
sends it again at once when doing so twice does what doing it once does (a read, a submit
with an idempotency key, an upload with its run key), and fails as before otherwise (a submit
without a key could make a second task). It failed every time with ConnectionFailed,
"cannot reach the server", while the service was there."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from orchestra.client import AsyncClient, Client, ConnectionFailed
from tests.conftest import Service


class AnswerLost:
    """Relays connections to ``target``; the first ``drops`` of them reach the service, whose
    answer is then lost: the connection is cut when it starts to come back."""

    def __init__(self, target: str, drops: int) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.drops = drops
        self.lost = 0
        self.url = ""
        self.server: asyncio.Server
        #: Called as the first answer is cut (the port closing with it: a restart).
        self.on_cut: Callable[[], None] = lambda: None

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        cut = self.lost < self.drops
        if cut:
            self.lost += 1
            self.on_cut()

        async def up() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if cut:
                    return  # the answer is lost
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(ConnectionError):
            await asyncio.wait(
                [asyncio.ensure_future(up()), asyncio.ensure_future(down())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        writer.transport.abort()
        up_writer.transport.abort()


@contextlib.asynccontextmanager
async def answer_lost(target: str, drops: int) -> AsyncIterator[AnswerLost]:
    relay = AnswerLost(target, drops)
    relay.server = await asyncio.start_server(relay.relay, "127.0.0.1", 0)
    relay.url = f"http://127.0.0.1:{relay.server.sockets[0].getsockname()[1]}"
    try:
        yield relay
    finally:
        relay.server.close()


async def _with(kind: str, url: str, use: Callable[[Any], Any]) -> Any:
    """``use(client)`` with a blocking or an asyncio client of ``url``."""
    if kind == "async":
        async with AsyncClient(url) as aclient:
            return await use(aclient)

    def blocking() -> Any:
        with Client(url) as client:
            return use(client)

    return await asyncio.to_thread(blocking)


KINDS = ["sync", "async"]


async def _tasks(service: Service) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await service.client.get("/api/v1/tasks")).json()["items"]
    return items


@pytest.mark.parametrize("kind", KINDS)
async def test_a_read_whose_answer_was_lost_is_sent_again(service: Service, kind: str) -> None:
    task = await service.submit("summarize", text="Read again.")
    async with answer_lost(service.url, drops=1) as relay:
        read = await _with(kind, relay.url, lambda c: c.get_task(task["id"]))
    assert relay.lost == 1
    assert read.id == task["id"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_submit_with_a_key_whose_answer_was_lost_is_sent_again_and_makes_one_task(
    service: Service, kind: str
) -> None:
    async with answer_lost(service.url, drops=1) as relay:
        made = await _with(
            kind,
            relay.url,
            lambda c: c.submit("summarize", {"text": "Once."}, idempotency_key="k-1"),
        )
    assert relay.lost == 1
    assert [t["id"] for t in await _tasks(service)] == [made.id]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_submit_without_a_key_whose_answer_was_lost_is_not_sent_twice(
    service: Service, kind: str
) -> None:
    async with answer_lost(service.url, drops=1) as relay:
        with pytest.raises(ConnectionFailed):
            await _with(kind, relay.url, lambda c: c.submit("summarize", {"text": "Once."}))
    assert relay.lost == 1
    assert len(await _tasks(service)) == 1  # made once, by the lost request


@pytest.mark.parametrize("kind", KINDS)
async def test_an_upload_sent_again_counts_each_byte_of_its_file_once(
    service: Service, kind: str, tmp_path: Any
) -> None:
    """``on_sent`` (the CLI's progress bar) hears the file once, however often it is sent."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "row {i} {"x" * 2000}"}}\n' for i in range(100)))
    sent: list[int] = []
    async with answer_lost(service.url, drops=1) as relay:
        made = await _with(
            kind,
            relay.url,
            lambda c: c.create_batch(
                "summarize", data, idempotency_key="up-1", on_sent=sent.append
            ),
        )
    assert relay.lost == 1
    assert made.read == 100 and made.refused == 0
    assert sum(sent) == data.stat().st_size


@pytest.mark.parametrize("kind", KINDS)
async def test_a_keyed_submit_whose_answer_was_lost_in_a_restart_waits_the_restart_out(
    service: Service, kind: str
) -> None:
    """The process that had the request stopped, and its port refused connections until the
    service was back: the resend was refused, and that refusal was the error ("cannot reach
    the server", ``broke`` False: as if nothing had been sent), though a task was made."""
    async with answer_lost(service.url, drops=1) as relay:
        host, port = relay.server.sockets[0].getsockname()[:2]
        loop = asyncio.get_running_loop()

        async def back() -> None:
            relay.server = await asyncio.start_server(relay.relay, host, port)

        def restart() -> None:  # the port closes with the lost answer, back in 1.2 s
            relay.server.close()
            loop.call_later(1.2, lambda: loop.create_task(back()))

        relay.on_cut = restart
        made = await _with(
            kind,
            relay.url,
            lambda c: c.submit("summarize", {"text": "Once."}, idempotency_key="k-restart"),
        )
    assert [t["id"] for t in await _tasks(service)] == [made.id]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_keyed_submit_whose_service_never_came_back_may_have_been_carried_out(
    service: Service, kind: str
) -> None:
    """Its last try was refused; the error is still the first one's: the request went out,
    and may have been carried out (``broke``), not "cannot reach the server"."""
    async with answer_lost(service.url, drops=1) as relay:
        relay.on_cut = lambda: relay.server.close()
        with pytest.raises(ConnectionFailed) as info:
            await _with(
                kind,
                relay.url,
                lambda c: c.submit("summarize", {"text": "Once."}, idempotency_key="k-gone"),
            )
    assert info.value.broke, info.value
    assert "then, sent again" in str(info.value) and "carried out" in str(info.value)
    assert len(await _tasks(service)) == 1
