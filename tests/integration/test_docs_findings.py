"""What a new user's reading of the docs found the service doing otherwise, each checked on a
real service over loopback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import pytest

from orchestra.api.app import create_app
from orchestra.api.server import HeaderTimeoutProtocol, server_config
from orchestra.client import AsyncClient, Client, ClientError, InvalidApiKey
from orchestra.config import ServerSettings, Settings
from tests.conftest import Service, sql_rows
from tests.fixtures.servers import serve
from tests.integration.test_cli import run_cli

#: "headers over 16 KB get 400" (README, Security).
KB16 = 16 * 1024

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def raw_connection(settings: Settings, protocol: str) -> AsyncIterator[Connection]:
    """The service served with the HTTP protocol ``orchestra serve`` uses ("service":
    httptools when installed) or h11's; a raw connection to it."""
    app = create_app(settings)
    http = server_config(app, ServerSettings()).http if protocol == "service" else None
    async with serve(app, http=http or HeaderTimeoutProtocol) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            yield reader, writer
        finally:
            writer.close()


def health_request(header_bytes: int) -> bytes:
    """GET /health with an X-Big header line of ``header_bytes`` (name and value, plus 4)."""
    value = b"a" * (header_bytes - len(b"X-Big") - 4)
    return b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + value + b"\r\n\r\n"


async def status_of_answer(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("protocol", ["service", "h11"])
async def test_headers_over_16_kb_get_400_whichever_way_they_arrive(
    settings: Settings, protocol: str
) -> None:
    async with raw_connection(settings, protocol) as (reader, writer):
        writer.write(health_request(KB16 - 200))  # within the limit, with Host and target
        assert await status_of_answer(reader) == 200
    # In one piece (one read for the server), the whole head at once.
    async with raw_connection(settings, protocol) as (reader, writer):
        writer.write(health_request(KB16 + 1000))
        assert await status_of_answer(reader) == 400
    # A piece at a time, complete in the end.
    async with raw_connection(settings, protocol) as (reader, writer):
        request = health_request(KB16 + 1000)
        for start in range(0, len(request), 1000):
            writer.write(request[start : start + 1000])
            await writer.drain()
            await asyncio.sleep(0.002)
        assert await status_of_answer(reader) == 400
    # A header line that never ends: refused once 16 KB of it arrived (not kept until the
    # header timeout, 10 s).
    async with raw_connection(settings, protocol) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(KB16 // 1000 + 1):
            writer.write(b"a" * 1000)
            await writer.drain()
            await asyncio.sleep(0.002)
        assert await status_of_answer(reader) == 400
        assert b"Invalid HTTP request" in await asyncio.wait_for(reader.read(), timeout=10)


@pytest.mark.parametrize("protocol", ["service", "h11"])
async def test_pipelined_requests_are_each_within_the_limit_however_many_come_at_once(
    settings: Settings, protocol: str
) -> None:
    """The limit is each request's headers: 300 small requests sent back to back in one
    write (about 17 KB: one read for the server) that ends inside the next one's headers are
    each answered, and so is that next one (the read was counted whole, and refused)."""
    one = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 20 + b"\r\n\r\n"
    count = KB16 // len(one) + 20
    async with raw_connection(settings, protocol) as (reader, writer):
        writer.write(one * count + one[:10])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(one[10:])
        statuses = [await whole_answer(reader) for _ in range(count + 1)]
    assert statuses == [200] * (count + 1)


async def whole_answer(reader: asyncio.StreamReader) -> int:
    """An answer's status, its body read past (by its content-length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("orc_\u2026", "a character that is not printable ASCII at character 5;"),
        ("orc_\u00e9t\u00e9", "a character that is not printable ASCII at character 5;"),
        ("orc_ ab", "a space at character 5 (give the key alone, without 'Bearer ');"),
        ("orc_\n", "a line break at character 5;"),
    ],
)
def test_a_key_that_cannot_be_sent_is_refused_when_the_client_is_made(
    key: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidApiKey, match=re.escape(said)) as caught:
        Client("http://127.0.0.1:1", api_key=key)
    assert isinstance(caught.value, ClientError) and key not in str(caught.value)
    assert "the api_key argument" in str(caught.value)
    monkeypatch.setenv("ORCHESTRA_API_KEY", key)
    with pytest.raises(InvalidApiKey, match="ORCHESTRA_API_KEY"):
        AsyncClient("http://127.0.0.1:1")


async def test_the_cli_exits_4_with_one_line_for_a_key_that_is_not_ascii(
    service: Service,
) -> None:
    code, out, err = await run_cli("tasks", "list", "--url", service.url, key="orc_\u00e9")
    assert (code, out) == (4, ""), err
    assert err.startswith(
        "Error: invalid API key in ORCHESTRA_API_KEY: a character that is not printable ASCII"
    )
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_head_health_sends_the_headers_of_get_and_no_body(service: Service) -> None:
    for path in ("/health", "/api/v1/health?probe=live"):
        got = await service.client.get(path)
        head = await service.client.head(path)
        assert (head.status_code, head.content) == (got.status_code, b"")
        assert int(head.headers["content-length"]) == len(got.content) > 100
        assert head.headers["content-type"] == got.headers["content-type"]
    # On the wire: the headers, and nothing after them on the kept-alive connection.
    host, port = service.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 404 ")
    finally:
        writer.close()


async def test_the_openapi_document_declares_what_the_answers_carry(service: Service) -> None:
    paths = (await service.client.get("/schema/openapi.json")).json()["paths"]
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for path in ("/health", "/api/v1/health"):
        answers = paths[path]["head"]["responses"]
        assert {"200", "400", "503"} <= set(answers)
        assert answers["400"]["content"]["application/json"]["schema"] == error_body
    redeliver = "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
    for path, method in [("/api/v1/templates/{name}", "delete"), (redeliver, "post")]:
        bad = paths[path][method]["responses"]["400"]
        assert bad["content"]["application/json"]["schema"] == error_body, path
    for path, method in [
        ("/api/v1/tasks", "post"),
        ("/api/v1/schedules", "post"),
        ("/api/v1/schedules/{ref}/run", "post"),
        ("/api/v1/templates", "post"),
    ]:
        assert "Location" in paths[path][method]["responses"]["201"]["headers"], path
    for path, item in paths.items():
        for method, operation in item.items():
            missing = operation["responses"].get("404", {}).get("description", "")
            if path.startswith(("/api/v1/webhooks", "/api/v1/batches")):
                assert "task or template" not in missing, (method, path)
            bad = operation["responses"].get("400")
            if bad is not None:
                assert bad["content"]["application/json"]["schema"] == error_body, path


async def test_durations_go_out_to_the_microsecond(service: Service, db_url: str) -> None:
    task = await service.wait((await service.submit("summarize", text="Queues."))["id"])
    assert task["status"] == "succeeded"
    # The times a duration is measured between, 304.766 ms apart: as a float difference,
    # 304.76599999999996.
    [(started,)] = sql_rows(db_url, "SELECT started_at FROM tasks WHERE id = ?", (task["id"],))
    start = datetime.fromisoformat(str(started)).replace(microsecond=0)
    end = start + timedelta(microseconds=304766)
    sql_rows(
        db_url,
        "UPDATE tasks SET started_at = ?, finished_at = ? WHERE id = ?",
        (start.isoformat(), end.isoformat(), task["id"]),
    )
    sql_rows(
        db_url,
        "UPDATE task_steps SET duration_ms = ? WHERE task_id = ?",
        ((end - start).total_seconds() * 1000, task["id"]),
    )
    shown = await service.client.get(f"/api/v1/tasks/{task['id']}")
    listed = await service.client.get("/api/v1/tasks")
    assert "304.76599" not in shown.text + listed.text
    assert {s["duration_ms"] for s in shown.json()["steps"]} == {304.766}
    assert listed.json()["items"][0]["duration_ms"] == 304.766


async def test_url_goes_before_the_command_as_config_does(service: Service) -> None:
    code, out, err = await run_cli("--url", service.url, "tasks", "list")
    assert (code, out, err.strip()) == (0, "", "no tasks")
    # The command's own --url wins; ORCHESTRA_URL gives way to the one given before.
    code, _, err = await run_cli(
        "--url", "http://127.0.0.1:1", "tasks", "list", "--url", service.url
    )
    assert code == 0, err
    env = {"ORCHESTRA_URL": "http://127.0.0.1:1"}
    code, _, err = await run_cli("--url", service.url, "tasks", "list", env=env)
    assert code == 0, err


async def test_a_parameter_of_the_wrong_type_exits_1_as_invalid_parameters_do(
    service: Service,
) -> None:
    url = ("--url", service.url)
    code, out, err = await run_cli(
        "submit", "summarize", "-p", "text=x", "-p", "sentences=abc", *url
    )
    assert (code, out) == (1, ""), err
    assert (
        err.strip() == "Error: invalid parameter sentences: expected integer (as JSON), got 'abc'"
    )
    # What the server finds wrong exits 1 too; a -p that is not NAME=VALUE is a usage error.
    code, _, err = await run_cli("submit", "summarize", "-p", "text=x", "-p", "sentences=0", *url)
    assert code == 1, err
    code, _, err = await run_cli("submit", "summarize", "-p", "text", *url)
    assert code == 2, err


async def test_only_a_get_of_one_schedule_has_its_next_and_latest_ticks(service: Service) -> None:
    spec = {"name": "pulse", "template": "summarize", "params": {"text": "x"}, "every": "1h"}
    made = await service.client.post("/api/v1/schedules", json=spec)
    changed = await service.client.patch("/api/v1/schedules/pulse", json={"priority": 3})
    listed = await service.client.get("/api/v1/schedules")
    one = await service.client.get("/api/v1/schedules/pulse")
    for answer in (made.json(), changed.json(), *listed.json()["items"]):
        assert "next_fire_times" not in answer and "last_tasks" not in answer, answer
        assert answer["next_fire_at"] is not None and answer["model"] is None
    assert len(one.json()["next_fire_times"]) == 5 and one.json()["last_tasks"] == []
