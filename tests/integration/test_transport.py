"""The transports under the shared client: the lean one for plain HTTP (keep-alive, limits,
every framing, httpx's errors) and the sharded httpx pools it hands other schemes to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest

from orchestra.llm.http import cause
from orchestra.llm.lean_transport import LeanTransport
from orchestra.llm.transport import ShardedTransport
from tests.fixtures.fake_ollama import running_fake_ollama
from tests.fixtures.servers import free_port, loopback_server, wait_until

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "one two three"}]}
STREAM = {**CHAT, "stream": True}
ANSWER = {**CHAT, "stream": False}


# -- a server that answers as a test script says -------------------------------------------


@dataclass
class Scripted:
    url: str
    connections: int = 0
    requests: int = 0


Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Scripted], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request from the connection; returns its body (Content-Length or chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    if b"transfer-encoding: chunked" in head:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return body
    length = 0
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


@asynccontextmanager
async def scripted(reply: Reply) -> AsyncIterator[Scripted]:
    """A raw HTTP server on a loopback port; ``reply`` serves each connection."""
    state = Scripted(url="")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        await reply(reader, writer, state)

    async with loopback_server(serve) as url:
        state.url = url
        yield state


def answer(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


# -- against the fake Ollama ---------------------------------------------------------------


async def test_calls_one_after_another_share_one_kept_alive_connection() -> None:
    transport = LeanTransport(max_connections=4)
    async with (
        running_fake_ollama() as fake,
        httpx.AsyncClient(transport=transport, timeout=5) as client,
    ):
        for _ in range(5):
            reply = await client.post(f"{fake.url}/api/chat", json=ANSWER)
            assert reply.json()["message"]["content"] == "ECHO: one two three"
            async with client.stream("POST", f"{fake.url}/api/chat", json=STREAM) as response:
                lines = [line async for line in response.aiter_lines() if line]
            assert len(lines) == 5  # "ECHO:" and three words, then the "done" line
        assert transport.connections == transport.idle == 1


async def test_no_more_calls_run_at_once_than_the_limit() -> None:
    transport = LeanTransport(max_connections=8)
    async with (
        running_fake_ollama(latency=0.2) as fake,
        httpx.AsyncClient(transport=transport, timeout=10) as client,
    ):
        replies = await asyncio.gather(
            *(client.post(f"{fake.url}/api/chat", json=ANSWER) for _ in range(20))
        )
        assert all(r.status_code == 200 for r in replies)
        assert fake.max_in_flight == 8
        assert transport.connections == 8


async def test_a_call_waits_for_a_free_connection_no_longer_than_the_pool_timeout() -> None:
    transport = LeanTransport(max_connections=1)
    async with (
        running_fake_ollama(latency=0.5) as fake,
        httpx.AsyncClient(transport=transport, timeout=5) as client,
    ):
        slow = asyncio.create_task(client.post(f"{fake.url}/api/chat", json=ANSWER))
        await wait_until(lambda: fake.in_flight == 1)  # it holds the one connection
        with pytest.raises(httpx.PoolTimeout):
            await client.get(f"{fake.url}/api/version", timeout=httpx.Timeout(5, pool=0.05))
        assert (await slow).status_code == 200
        assert (await client.get(f"{fake.url}/api/version")).status_code == 200


async def test_a_body_left_unread_closes_its_connection_and_frees_its_slot() -> None:
    transport = LeanTransport(max_connections=1)
    async with (
        running_fake_ollama(word_delay=0.01) as fake,
        httpx.AsyncClient(transport=transport, timeout=5) as client,
    ):
        async with client.stream("POST", f"{fake.url}/api/chat", json=STREAM) as response:
            async for _line in response.aiter_lines():
                break
        assert transport.connections == 0
        assert (await client.get(f"{fake.url}/api/version")).status_code == 200
        assert transport.connections == 1


async def test_a_slow_answer_is_a_read_timeout_and_its_connection_is_dropped() -> None:
    transport = LeanTransport(max_connections=1)
    async with (
        running_fake_ollama(latency=2) as fake,
        httpx.AsyncClient(transport=transport) as client,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{fake.url}/api/chat", json=ANSWER, timeout=0.1)
        assert transport.connections == 0
        assert (await client.get(f"{fake.url}/api/version")).status_code == 200


async def test_nothing_listening_is_a_connect_error_that_names_its_cause() -> None:
    transport = LeanTransport()
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{free_port()}/")
    assert cause(caught.value) == "Connection refused"
    assert transport.connections == 0


async def test_a_host_that_does_not_resolve_is_said_so() -> None:
    """A name lookup's error numbers are not errno's: it said "Unknown error -2" for a model
    server's mistyped host (helper-134). (``.invalid`` never resolves, RFC 6761.)"""
    transport = LeanTransport()
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get("http://gpu-box.invalid:11434/")
    said = cause(caught.value)
    assert said.startswith("the host name does not resolve") and "Unknown error" not in said


async def test_other_schemes_go_to_the_fallback_transport() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"data": []})

    transport = LeanTransport(fallback=httpx.MockTransport(handler))
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("https://api.example.test/v1/models")).json() == {"data": []}
    assert seen == ["https://api.example.test/v1/models"]


# -- against a scripted server: the framings and failures a model server can show ----------


async def test_bodies_framed_by_length_chunks_or_the_end_of_the_connection_are_read_whole() -> None:
    async def reply(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Scripted
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"by length"))
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nby \r\n6\r\nchunks\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")

    transport = LeanTransport()
    async with scripted(reply) as server, httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(server.url)).text == "by length"
        assert (await client.get(server.url)).text == "by chunks"
        assert (await client.get(server.url)).status_code == 204
        assert (await client.get(server.url)).text == "until the end"
        assert server.connections == 1
        assert transport.connections == 0  # the last answer ended with the connection


async def test_a_streamed_request_body_is_sent_in_chunks() -> None:
    async def reply(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Scripted
    ) -> None:
        writer.write(answer(b"got " + await read_request(reader)))

    async def parts() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    async with scripted(reply) as server, httpx.AsyncClient(transport=LeanTransport()) as client:
        assert (await client.post(server.url, content=parts())).text == "got hello world"


async def test_a_kept_connection_the_server_closed_meanwhile_is_replaced_by_a_new_one() -> None:
    async def reply(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted
    ) -> None:
        while True:
            await read_request(reader)
            s.requests += 1
            if s.requests == 2:
                return  # closes without an answer: the request crossed the server's close
            writer.write(answer(b"ok"))

    async with scripted(reply) as server, httpx.AsyncClient(transport=LeanTransport()) as client:
        assert (await client.post(server.url, json=ANSWER)).text == "ok"
        assert (await client.post(server.url, json=ANSWER)).text == "ok"
        assert (server.connections, server.requests) == (2, 3)


async def test_a_server_hanging_up_mid_body_is_a_remote_protocol_error() -> None:
    async def reply(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Scripted
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    transport = LeanTransport()
    async with scripted(reply) as server, httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url)
    assert transport.connections == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70_000 + b"\r\n\r\n",
    ],
)
async def test_an_answer_that_is_not_http_is_a_remote_protocol_error(garbage: bytes) -> None:
    async def reply(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Scripted
    ) -> None:
        await read_request(reader)
        writer.write(garbage)

    transport = LeanTransport()
    async with scripted(reply) as server, httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url)
    assert transport.connections == 0


# -- the sharded httpx pools (https:// and other schemes) ----------------------------------


async def test_requests_spread_over_pools_and_all_run_at_once() -> None:
    transport = ShardedTransport(max_connections=40, pool_size=8)
    assert transport.pools == 5
    async with (
        running_fake_ollama(latency=0.3) as fake,
        httpx.AsyncClient(transport=transport, timeout=10) as client,
    ):

        async def call() -> int:
            async with client.stream("POST", f"{fake.url}/api/chat", json=STREAM) as response:
                lines = [line async for line in response.aiter_lines() if line]
                return len(lines)

        counts = await asyncio.gather(*(call() for _ in range(40)))
        assert all(n > 1 for n in counts)
        # Forty 0.3 s calls on forty connections overlap: all in flight together.
        assert fake.max_in_flight == 40
        assert transport.in_flight == (0,) * 5


async def test_counts_come_back_after_failures_and_early_close() -> None:
    transport = ShardedTransport(max_connections=4, pool_size=2)
    async with (
        running_fake_ollama() as fake,
        httpx.AsyncClient(transport=transport, timeout=5) as client,
    ):
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")
        async with client.stream("POST", f"{fake.url}/api/chat", json=STREAM) as response:
            async for _line in response.aiter_lines():
                break  # closed before the end of the body
        assert transport.in_flight == (0, 0)
        assert (await client.get(f"{fake.url}/api/version")).status_code == 200
        assert transport.in_flight == (0, 0)
