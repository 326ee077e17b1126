"""What the HTTP providers make of answers a model server should not send.

Each server here is real, on a loopback port, and writes exactly the bytes a case gives: an
answer that trickles in, one too long for any step, one endless line, nonsense token counts,
replies without the answer's fields, a busy server's Retry-After, a redirect, an HTML page.
Every case runs through both kinds of provider (Ollama's, the OpenAI-compatible) and each way
an answer is read: a chat whose answer streams (an llm step), one whose answer comes whole (a
map's items), an embedding.
"""

from __future__ import annotations

import asyncio
import http
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import msgspec
import pytest

from orchestra.config import Settings
from orchestra.errors import InvalidOutput, ProviderBusy, ProviderError, ProviderUnavailable
from orchestra.llm.base import ChatMessage, ChatRequest, ChatResult, EmbedResult
from orchestra.llm.http import HttpProvider
from orchestra.llm.ollama import OllamaProvider
from orchestra.llm.openai import OpenAIProvider
from orchestra.llm.transport import model_client
from tests.conftest import StartService, with_provider
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.fake_openai import running_fake_openai
from tests.fixtures.servers import loopback_server

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]

KINDS = ["ollama", "openai"]
#: The ways an answer is read: streamed, whole (a chat without streaming), an embedding.
WAYS = ["stream", "whole", "embed"]
JSON = "application/json"
REQUEST = ChatRequest(model="m", messages=(ChatMessage("user", "hello"),))

#: A step's output limit for the cases about sizes, and what it lets a provider read:
#: six bytes of JSON for each byte of text (``\u003c`` for "<"), and 64 KiB besides.
OUTPUT_LIMIT = 10_000
BOUND = "122.6 KiB"  # 6 * 10,000 + 65,536 bytes
#: What a server sends of an endless answer, at most.
ENDLESS = 64 * 1024 * 1024


def media(kind: str, way: str) -> str:
    """The media type a server answers ``way`` with."""
    if way != "stream":
        return JSON
    return "application/x-ndjson" if kind == "ollama" else "text/event-stream"


def raw(
    status: int,
    body: bytes = b"",
    content_type: str | None = JSON,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A whole HTTP/1.1 answer, as bytes on the wire."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sends(data: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    return answer


@asynccontextmanager
async def provider_at(
    kind: str, answer: Answer, *, v1: bool = True, **options: Any
) -> AsyncIterator[HttpProvider]:
    """A provider of ``kind`` for a server that reads each request and answers with
    ``answer`` (OpenAI's at the server's ``/v1``, unless not ``v1``)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        await answer(writer)

    async with loopback_server(serve) as url, model_client(4, {}) as client:
        timeout = options.pop("timeout", 5.0)
        if kind == "ollama":
            yield OllamaProvider("o", client, url, timeout, **options)
        else:
            yield OpenAIProvider("oai", client, f"{url}/v1" if v1 else url, timeout, **options)


async def call(provider: HttpProvider, way: str) -> ChatResult | EmbedResult:
    """Ask ``provider`` the ``way`` a step would."""
    if way == "embed":
        return await provider.embed("m", ["hello"])
    return await provider.chat(REQUEST, (lambda _text: None) if way == "stream" else None)


class Endless:
    """Answers with a body that never ends (up to :data:`ENDLESS` bytes, no line end),
    counting what it could send before the client hung up."""

    def __init__(self, content_type: str, declared: bool, status: int = 200) -> None:
        self.content_type = content_type
        #: Whether the head says how long the body is (else it ends with the connection).
        self.declared = declared
        self.status = status
        self.sent = 0

    async def __call__(self, writer: asyncio.StreamWriter) -> None:
        framing = f"Content-Length: {ENDLESS}" if self.declared else "Connection: close"
        status = f"{self.status} {http.HTTPStatus(self.status).phrase}"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {self.content_type}\r\n{framing}\r\n\r\n".encode()
        )
        piece = b"a" * 65536
        while self.sent < ENDLESS:
            writer.write(piece)
            await writer.drain()  # raises once the client has hung up
            self.sent += len(piece)


def too_long(provider: HttpProvider, what: str) -> str:
    return (
        f"{provider.where} sent {what} of more than {BOUND}: more than a step's output may hold, "
        "whatever its encoding (the limit is 9.8 KiB: [limits] max_step_output_bytes)"
    )


# -- the whole call within the timeout ----------------------------------------------------------


def trickle(content_type: str) -> Answer:
    """An answer that never finishes: a byte every 0.1 s (each read well within httpx's
    timeout), for a minute or until the client hangs up."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: 1000000\r\n\r\n"
        writer.write(head.encode())
        for _ in range(600):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.1)

    return answer


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
async def test_an_answer_that_trickles_in_fails_at_the_providers_timeout(
    kind: str, way: str
) -> None:
    async with provider_at(kind, trickle(media(kind, way)), timeout=1.0) as provider:
        started = time.perf_counter()
        with pytest.raises(ProviderUnavailable) as failed:
            async with asyncio.timeout(15):  # the test's own deadline: not the provider's
                await call(provider, way)
        took = time.perf_counter() - started
    assert failed.value.message == f"{provider.where} did not answer within 1s"
    assert failed.value.retryable
    assert took < 5


@pytest.mark.parametrize("kind", KINDS)
async def test_a_health_check_of_a_server_that_trickles_ends_within_its_bound(kind: str) -> None:
    async with provider_at(kind, trickle(JSON)) as provider:
        started = time.perf_counter()
        async with asyncio.timeout(15):
            health = await provider.health()
        took = time.perf_counter() - started
    assert not health.ok
    assert health.detail == f"{provider.shown_url} did not answer within 2s"
    assert took < 5


# -- what is read of an answer --------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-closed"])
@pytest.mark.parametrize("way", ["whole", "embed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_an_answer_too_long_for_a_step_fails_before_it_is_read(
    kind: str, way: str, declared: bool
) -> None:
    server = Endless(JSON, declared)
    async with provider_at(kind, server, output_limit=OUTPUT_LIMIT, timeout=30) as provider:
        with pytest.raises(InvalidOutput) as failed:
            async with asyncio.timeout(15):
                await call(provider, way)
    assert failed.value.message == too_long(provider, "an answer")
    assert not failed.value.retryable
    assert server.sent < ENDLESS // 4  # what the sockets' buffers took, not the answer


@pytest.mark.parametrize("kind", KINDS)
async def test_a_streamed_line_too_long_for_a_step_fails_as_soon_as_it_passes_the_bound(
    kind: str,
) -> None:
    server = Endless(media(kind, "stream"), declared=False)
    async with provider_at(kind, server, output_limit=OUTPUT_LIMIT, timeout=30) as provider:
        with pytest.raises(InvalidOutput) as failed:
            async with asyncio.timeout(15):
                await call(provider, "stream")
    assert failed.value.message == too_long(provider, "a line")
    assert server.sent < ENDLESS // 4


@pytest.mark.parametrize("kind", KINDS)
async def test_an_endless_error_page_is_read_only_for_its_reason(kind: str) -> None:
    server = Endless("text/plain", declared=True, status=500)
    async with provider_at(kind, server, timeout=30) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            async with asyncio.timeout(15):
                await call(provider, "whole")
    assert failed.value.message == f"{provider.where} answered 500: {'a' * 200}"
    assert server.sent < ENDLESS // 4


@pytest.mark.parametrize("way", ["stream", "whole"])
@pytest.mark.parametrize("kind", KINDS)
async def test_an_answer_whose_json_escapes_every_character_is_read_whole(
    kind: str, way: str
) -> None:
    # Go's encoder (Ollama's) writes "<" as \u003c: six bytes for one of the text. The text
    # fits the step (9,990 characters and two quotes), so its answer must be read.
    text = "<" * 9_990
    escaped = text.replace("<", "\\u003c")
    if kind == "ollama":
        body = f'{{"model":"m","message":{{"role":"assistant","content":"{escaped}"}},"done":true}}'
    elif way == "whole":
        body = f'{{"choices":[{{"message":{{"content":"{escaped}"}},"finish_reason":"stop"}}]}}'
    else:
        body = f'data: {{"choices":[{{"delta":{{"content":"{escaped}"}}}}]}}\n\ndata: [DONE]\n\n'
    answer = sends(raw(200, body.encode(), media(kind, way)))
    async with provider_at(kind, answer, output_limit=OUTPUT_LIMIT) as provider:
        result = await call(provider, way)
    assert isinstance(result, ChatResult) and result.text == text


MAP_OF_LLM = """\
name: items
model: llama3.2
steps:
  - id: each
    kind: map
    over: "[1, 2]"
    step:
      prompt: "item {{ item }}"
"""


async def test_a_map_item_whose_answer_is_too_long_fails_naming_the_limit(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    # A map's items do not stream: the step's limit must reach the provider through the
    # settings, and the answer fail as it is read.
    limits = msgspec.structs.replace(settings.limits, max_step_output_bytes=OUTPUT_LIMIT)
    fake_ollama.reply = lambda _body: "x" * 300_000
    async with start_service(msgspec.structs.replace(settings, limits=limits)) as svc:
        response = await svc.client.post("/api/v1/templates", content=MAP_OF_LLM)
        assert response.status_code == 201, response.text
        task = await svc.wait((await svc.submit("items"))["id"])
    assert task["status"] == "failed"
    assert task["error"]["type"] == "invalid_output" and not task["error"].get("retryable")
    # Its two items run at once: whichever failed first is named.
    item, _, message = task["error"]["message"].partition(": ")
    assert item in ("item 0 of steps.each", "item 1 of steps.each"), item
    assert message == (
        f"Ollama at {fake_ollama.url} sent an answer of more than {BOUND}: more than a step's "
        "output may hold, whatever its encoding (the limit is 9.8 KiB: [limits] "
        "max_step_output_bytes)"
    )


# -- token counts -----------------------------------------------------------------------------


def counted(kind: str, way: str, count: Any) -> bytes:
    """A good answer whose every count is ``count``."""
    n = msgspec.json.encode(count).decode()
    if kind == "ollama":
        stats = f'"prompt_eval_count":{n},"eval_count":{n},"total_duration":{n}'
        if way == "embed":
            return f'{{"model":"m","embeddings":[[0.5]],{stats}}}'.encode()
        last = f'{{"model":"m","message":{{"role":"assistant","content":""}},"done":true,{stats}}}'
        if way == "whole":
            return last.replace('"content":""', '"content":"hi"').encode()
        piece = '{"model":"m","message":{"role":"assistant","content":"hi"},"done":false}'
        return f"{piece}\n{last}\n".encode()
    usage = f'"usage":{{"prompt_tokens":{n},"completion_tokens":{n}}}'
    if way == "embed":
        return f'{{"data":[{{"embedding":[0.5],"index":0}}],"model":"m",{usage}}}'.encode()
    if way == "whole":
        choice = '{"message":{"content":"hi"},"finish_reason":"stop"}'
        return f'{{"choices":[{choice}],{usage}}}'.encode()
    return (
        'data: {"choices":[{"delta":{"role":"assistant","content":"hi"}}]}\n\n'
        'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        f'data: {{"choices":[],{usage}}}\n\n'
        "data: [DONE]\n\n"
    ).encode()


@pytest.mark.parametrize("count", [-5, 2.5, "7", True])
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
async def test_counts_that_are_no_non_negative_integers_are_unknown(
    kind: str, way: str, count: Any
) -> None:
    answer = sends(raw(200, counted(kind, way, count), media(kind, way)))
    async with provider_at(kind, answer) as provider:
        result = await call(provider, way)
    assert result.usage.prompt_tokens is None
    assert result.usage.completion_tokens is None
    if kind == "ollama":
        assert result.usage.total_ms is None


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
async def test_good_counts_are_kept(kind: str, way: str) -> None:
    answer = sends(raw(200, counted(kind, way, 7), media(kind, way)))
    async with provider_at(kind, answer) as provider:
        result = await call(provider, way)
    assert result.usage.prompt_tokens == 7
    ollama_embed = kind == "ollama" and way == "embed"  # /api/embed counts the input only
    assert result.usage.completion_tokens == (None if ollama_embed else 7)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_task_whose_server_reports_negative_counts_succeeds_with_them_unknown(
    kind: str, settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    async with running_fake_openai() as fake_openai:
        if kind == "ollama":
            fake_ollama.counts = {"prompt_eval_count": -5, "eval_count": -5}
        else:
            fake_openai.counts = {"prompt_tokens": -5, "completion_tokens": -5}
            settings = with_provider(settings, "oai", kind="openai", url=fake_openai.url)
            settings = msgspec.structs.replace(
                settings, models={**settings.models, "default": ["oai/gpt-fake"]}
            )
        async with start_service(settings) as svc:
            task = await svc.wait((await svc.submit("summarize", text="The cat sat."))["id"])
    assert task["status"] == "succeeded", task["error"]
    usage = task["steps"][0]["usage"]
    assert "prompt_tokens" not in usage and "completion_tokens" not in usage


# -- answers without the answer's fields --------------------------------------------------------

OLLAMA_PIECE = '{"model":"m","message":{"role":"assistant","content":"Hello"},"done":false}\n'
OLLAMA_LAST = (
    '{"model":"m","message":{"role":"assistant","content":""},"done":true,'
    '"done_reason":"stop","eval_count":1}\n'
)

MALFORMED = [
    ("ollama", "whole", '{"model":"missing"}', 'a reply without "message"'),
    # /api/generate's answer, where /api/chat's was due.
    ("ollama", "whole", '{"model":"m","response":"hi","done":true}', 'a reply without "message"'),
    (
        "ollama",
        "whole",
        '{"model":"m","message":{"role":"assistant","content":"hi"}}',
        'a reply without "done"',
    ),
    (
        "ollama",
        "stream",
        '{"model":"m","message":{"role":"assistant","content":"hi"}}\n',
        'a line without "done"',
    ),
    ("ollama", "stream", '{"done":false}\n{"done":true}\n', 'no line carried a "message"'),
    (
        "openai",
        "stream",
        'data: {"choices":[{}]}\n\ndata: [DONE]\n\n',
        'no chunk carried a choice with "delta.content" or "finish_reason"',
    ),
    (
        "openai",
        "whole",
        '{"choices":[{"message":{}}]}',
        'a choice without "message.content" or "finish_reason"',
    ),
]


@pytest.mark.parametrize(("kind", "way", "body", "what"), MALFORMED)
async def test_a_reply_without_the_answers_fields_is_malformed_not_empty(
    kind: str, way: str, body: str, what: str
) -> None:
    answer = sends(raw(200, body.encode(), media(kind, way)))
    async with provider_at(kind, answer) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, way)
    assert type(failed.value) is ProviderError  # permanent: the same answer would come back
    assert failed.value.message == f"{provider.where} sent a malformed answer: {what}"


LEGAL = [
    # Real Ollama: "done": false on each piece, a last line with the statistics.
    ("ollama", "stream", OLLAMA_PIECE + OLLAMA_LAST, "Hello"),
    ("ollama", "stream", OLLAMA_LAST, ""),  # it finished without a word
    ("ollama", "whole", OLLAMA_LAST.replace('"content":""', '"content":"Hi"'), "Hi"),
    ("ollama", "whole", OLLAMA_LAST, ""),
    # Real OpenAI-compatible servers: the role alone first, an empty delta with the finish
    # reason, the usage alone last.
    (
        "openai",
        "stream",
        'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
        'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
        'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        "data: [DONE]\n\n",
        "Hello",
    ),
    (
        "openai",
        "stream",
        'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
        "",
    ),
    (
        "openai",
        "stream",
        'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\ndata: [DONE]\n\n',
        "",
    ),
    ("openai", "whole", '{"choices":[{"message":{"content":null},"finish_reason":"stop"}]}', ""),
    ("openai", "whole", '{"choices":[{"message":{"content":"Hi"}}]}', "Hi"),
]


@pytest.mark.parametrize(("kind", "way", "body", "text"), LEGAL)
async def test_answers_real_servers_send_are_read_even_when_empty(
    kind: str, way: str, body: str, text: str
) -> None:
    answer = sends(raw(200, body.encode(), media(kind, way)))
    async with provider_at(kind, answer) as provider:
        result = await call(provider, way)
    assert isinstance(result, ChatResult) and result.text == text


# -- a busy server's Retry-After ----------------------------------------------------------------


def in_30s() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)


@pytest.mark.parametrize(
    ("status", "retry_after", "low", "high"),
    [(429, lambda: "20", 20, 20), (503, in_30s, 28, 30)],
    ids=["429-seconds", "503-date"],
)
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_busy_servers_retry_after_is_carried_on_the_error_and_named(
    kind: str, way: str, status: int, retry_after: Callable[[], str], low: float, high: float
) -> None:
    body = b'{"error": "busy"}'
    answer = sends(raw(status, body, headers={"Retry-After": retry_after()}))
    async with provider_at(kind, answer) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            await call(provider, way)
    error = failed.value
    assert error.retryable and error.code == "provider_unavailable"
    wait = error.retry_after  # type: ignore[attr-defined]
    assert low <= wait <= high
    assert error.message == (
        f"{provider.where} answered {status}: busy "
        f"(it asks to wait {math.ceil(wait)}s: Retry-After)"
    )


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "soon"}], ids=["none", "unreadable"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_busy_server_without_retry_after_leaves_the_wait_to_the_retry_policy(
    kind: str, headers: dict[str, str]
) -> None:
    answer = sends(raw(429, b'{"error": "busy"}', headers=headers))
    async with provider_at(kind, answer) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            await call(provider, "whole")
    assert failed.value.message == f"{provider.where} answered 429: busy"
    assert not isinstance(failed.value, ProviderBusy)
    assert failed.value.retry_after == 0.0  # no wait of its own: the policy's delay


# -- redirects and answers of the wrong type ------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_redirect_is_reported_as_one_not_as_unreadable_json(kind: str, way: str) -> None:
    location = "https://user:secret@models.example/api"
    answer = sends(raw(302, b"<html>Found</html>", "text/html", {"Location": location}))
    async with provider_at(kind, answer) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, way)
    assert type(failed.value) is ProviderError  # permanent: the URL needs fixing
    assert failed.value.message == (
        f"{provider.where} answered 302 (redirect to https://***@models.example/api; "
        "redirects are not followed: check the provider's url)"
    )


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
async def test_an_html_page_is_reported_by_its_type(kind: str, way: str) -> None:
    page = b"<!doctype html><html><body>Please sign in</body></html>\n"
    answer = sends(raw(200, page, "text/html; charset=utf-8"))
    async with provider_at(kind, answer) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, way)
    assert type(failed.value) is ProviderError
    assert failed.value.message == (f"{provider.where} answered text/html, not {media(kind, way)}")


@pytest.mark.parametrize("way", ["stream", "whole"])
async def test_a_404_page_at_a_url_without_v1_asks_whether_v1_is_missing(way: str) -> None:
    page = sends(raw(404, b"404 page not found", "text/plain"))
    async with provider_at("openai", page, v1=False) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, way)
    assert failed.value.message.endswith(": 404 page not found (is /v1 missing from the url?)")
    async with provider_at("openai", page, v1=True) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, way)
    assert failed.value.message.endswith(": 404 page not found")  # /v1 is there
    server_said = sends(raw(404, b'{"error": {"message": "The model `m` does not exist"}}'))
    async with provider_at("openai", server_said, v1=False) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, way)
    assert failed.value.message.endswith(": The model `m` does not exist")


#: A streamed answer cut off in the middle of its second line (the connection closed there,
#: with the body's framing complete: it ends with the connection).
CUT_MID_LINE = {
    "ollama": OLLAMA_PIECE + '{"model":"m","message":{"role":"assistant","content":"wor',
    "openai": 'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    'data: {"choices":[{"delta":{"content":"wor',
}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_cut_off_in_the_middle_of_a_line_may_be_tried_again(kind: str) -> None:
    """A connection lost in the middle of a line is a connection lost, as one lost between
    two lines is: retryable (it was a permanent "unreadable line")."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {media(kind, 'stream')}\r\nConnection: close\r\n\r\n"
    answer = sends(head.encode() + CUT_MID_LINE[kind].encode())
    async with provider_at(kind, answer) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            await call(provider, "stream")
    assert failed.value.message == f"{provider.where} cut its answer off in the middle of a line"


async def test_an_empty_data_line_is_unreadable_not_cut_off() -> None:
    """msgspec calls empty input truncated too: an empty ``data:`` line is no cut answer."""
    answer = sends(raw(200, b"data: \n\ndata: [DONE]\n\n", "text/event-stream"))
    async with provider_at("openai", answer) as provider:
        with pytest.raises(ProviderError) as failed:
            await call(provider, "stream")
    assert type(failed.value) is ProviderError, failed.value
