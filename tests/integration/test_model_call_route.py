"""A model call sent straight to the lean transport (``transport.direct_route``) and one sent
through httpx's client send the same request: the same body bytes, the cookies a server set
(a load balancer's sticky session). A real server on a loopback port records what arrives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from orchestra.llm.base import ChatMessage, ChatRequest
from orchestra.llm.ollama import OllamaProvider
from orchestra.llm.transport import direct_route, model_client
from tests.fixtures.servers import loopback_server

ANSWER = b'{"model":"m","message":{"role":"assistant","content":"hi"},"done":true}\n'


class Recorder:
    """What each request brought: its headers (lower-case names) and its body."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []


@asynccontextmanager
async def sticky_server() -> AsyncIterator[tuple[str, Recorder]]:
    """An Ollama-like /api/chat on a free port whose answers set a cookie."""
    seen = Recorder()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            lines = head.decode("latin-1").split("\r\n")[1:]
            fields = (line.partition(":") for line in lines if line)
            headers = {name.strip().lower(): value.strip() for name, _, value in fields}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen.requests.append((headers, body))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Set-Cookie: sticky=abc; Path=/\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
            )
            await writer.drain()

    async with loopback_server(serve) as url:
        yield url, seen


def request(**options: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=(ChatMessage("user", "hello"),), options=options)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cookie_the_server_set_goes_back_with_the_next_call(stream: bool) -> None:
    async with sticky_server() as (url, seen), model_client(4, {}) as client:
        provider = OllamaProvider("o", client, url, 5)
        assert direct_route(client, url) is not None  # the first call skips the client
        on_text = (lambda _text: None) if stream else None
        for _ in range(2):
            assert (await provider.chat(request(), on_text)).text == "hi"
    first, second = (headers for headers, _ in seen.requests)
    assert "cookie" not in first
    assert second["cookie"] == "sticky=abc"


async def test_both_routes_send_the_same_headers_and_body_even_for_a_nan_option() -> None:
    async with sticky_server() as (url, seen), model_client(4, {}) as client:
        direct = OllamaProvider("o", client, url, 5)
        # Credentials in the URL: httpx's Basic auth, so the client's route.
        through_client = OllamaProvider("o", client, url.replace("//", "//u:p@"), 5)
        assert direct_route(client, through_client.url) is None
        for provider in (direct, through_client):
            client.cookies.clear()
            await provider.chat(request(temperature=float("nan"), seed=7))
    bodies = [json.loads(body) for _, body in seen.requests]
    assert bodies[0] == bodies[1]
    assert bodies[0]["options"] == {"temperature": None, "seed": 7}
    assert seen.requests[1][0].pop("authorization").startswith("Basic ")
    assert seen.requests[0][0] == seen.requests[1][0]  # Host, Content-Length, Content-Type…
    assert seen.requests[0][0]["content-length"] == str(len(seen.requests[0][1]))
