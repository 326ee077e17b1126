"""Log levels: libraries' chatter stays out of Orchestra's lines."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from orchestra import logs
from orchestra.config import LoggingSettings
from orchestra.llm import model_wire as wire
from orchestra.llm.model_process import ModelProcess, State
from tests.fixtures.logs import captured


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, structlog.get_config()
    levels = {n: logging.getLogger(n).level for n in ("httpx", "httpcore", "aiosqlite")}
    yield
    root.handlers[:], level, config = saved
    root.setLevel(level)
    structlog.configure(**config)
    for name, was in levels.items():
        logging.getLogger(name).setLevel(was)


@pytest.mark.usefixtures("restored")
def test_at_info_a_request_line_of_httpx_is_left_out() -> None:
    out = io.StringIO()
    logs.setup(LoggingSettings(level="info", format="json"), out)
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:11434/api/tags")
    logging.getLogger("httpx").warning("httpx says something is wrong")
    logs.get("orchestra.test").info("orchestra.says")
    written = out.getvalue()
    assert "api/tags" not in written
    assert "something is wrong" in written and "orchestra.says" in written


@pytest.mark.usefixtures("restored")
def test_at_debug_orchestra_speaks_and_aiosqlite_does_not_flood() -> None:
    out = io.StringIO()
    logs.setup(LoggingSettings(level="debug", format="json"), out)
    logging.getLogger("aiosqlite").debug("executing functools.partial(<create_function>)")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:11434/api/tags")
    logs.get("orchestra.test").debug("orchestra.detail")
    written = out.getvalue()
    assert "executing" not in written and "connect_tcp" not in written
    assert "api/tags" in written and "orchestra.detail" in written


def test_an_outage_is_logged_once_then_every_minute_then_its_end() -> None:
    now = [0.0]
    lines: list[tuple[str, str, dict[str, object]]] = []

    class Logger:
        def warning(self, event: str, **fields: object) -> None:
            lines.append(("warning", event, fields))

        def info(self, event: str, **fields: object) -> None:
            lines.append(("info", event, fields))

    outage = logs.Outage(Logger(), "feed.read_failed", every=60.0, clock=lambda: now[0])
    for second in range(0, 125):  # a try a second for a little over two minutes
        now[0] = float(second)
        outage.failed(ConnectionError("the database went away"))
    outage.succeeded()
    outage.succeeded()  # nothing more to say
    assert [(level, event) for level, event, _ in lines] == [
        ("warning", "feed.read_failed"),
        ("warning", "feed.read_failed"),
        ("warning", "feed.read_failed"),
        ("info", "feed.read_recovered"),
    ]
    assert [fields.get("failures") for _, _, fields in lines[:3]] == [1, 61, 121]
    assert lines[0][2]["error"] == "ConnectionError: the database went away"
    assert lines[3][2] == {"after_failures": 125, "lasted_s": 124.0}


def test_an_outage_that_lasts_is_logged_at_error_level_saying_for_how_long() -> None:
    """The queue's claims failed for 12 minutes with one warning and nothing at error level:
    an operator alerting on errors never heard of it."""
    now = [0.0]
    lines: list[tuple[str, dict[str, object]]] = []

    class Logger:
        def warning(self, event: str, **fields: object) -> None:
            lines.append(("warning", fields))

        def error(self, event: str, **fields: object) -> None:
            lines.append(("error", fields))

        def info(self, event: str, **fields: object) -> None:
            lines.append(("info", fields))

    outage = logs.Outage(
        Logger(), "pool.claim_failed", every=60.0, error_after=60.0, clock=lambda: now[0]
    )
    for second in range(0, 181, 5):  # a try every 5 s for three minutes
        now[0] = float(second)
        outage.failed(ConnectionError("down"))
    assert [(level, fields["lasted_s"]) for level, fields in lines] == [
        ("warning", 0.0),
        ("error", 60.0),
        ("error", 120.0),
        ("error", 180.0),
    ]
    outage.succeeded()
    assert lines[-1] == ("info", {"after_failures": 37, "lasted_s": 180.0})


def test_failures_of_requests_end_an_outage_after_a_quiet_spell() -> None:
    """Refused requests have no try that works to end their outage: a quiet spell does, and
    the next failure is a new outage, logged at once and counted from one."""
    now = [0.0]
    lines: list[dict[str, object]] = []

    class Logger:
        def warning(self, event: str, **fields: object) -> None:
            lines.append({"event": event, **fields})

    outage = logs.Outage(
        Logger(), "api.storage_failed", every=10.0, ends_after=10.0, clock=lambda: now[0]
    )
    for tenth in range(0, 250):  # 10 refusals a second for 25 s
        now[0] = tenth / 10
        outage.failed(ConnectionError("down"), code="storage_unavailable")
    assert [line["failures"] for line in lines] == [1, 101, 201]
    assert lines[0]["code"] == "storage_unavailable"
    now[0] = 60.0  # 35 s later, another outage
    outage.failed(ConnectionError("down again"))
    assert lines[-1]["failures"] == 1 and lines[-1]["error"] == "ConnectionError: down again"


async def test_a_task_s_lines_name_it_and_a_shared_task_it_starts_does_not() -> None:
    """A run binds its task to what it calls; a reader it happens to start (a model process's)
    outlives it and must not name it on every line after."""
    log = logs.get("test")

    async def shared() -> None:
        log.warning("shared.line")

    async def run() -> asyncio.Task[None]:
        logs.bind_task(7, "t", 1)
        log.warning("run.line")
        return logs.shared_task(shared(), "reader")

    with captured(logging.WARNING) as logged:
        reader = await asyncio.create_task(run())
        await reader
        log.warning("after.line")
    by_event = {e["event"]: e.get("task_id") for e in logged}
    assert by_event == {"run.line": 7, "shared.line": None, "after.line": None}


async def test_a_shared_model_process_s_state_lines_do_not_name_the_task_that_started_it() -> None:
    """The model process's "starting" line was logged in the context of the task whose call
    started it, so it named that task."""
    proc = ModelProcess("embedded", wire.Load("/nowhere.gguf", 0, 0))

    async def a_run() -> None:
        logs.bind_task(7, "t", 1)
        proc._set(State.STARTING, "loading the model")

    with captured() as logged:
        await asyncio.create_task(a_run())
    [line] = [e for e in logged if e["event"] == "model_process.state"]
    assert "task_id" not in line, line
