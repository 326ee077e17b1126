"""What a task stores and what the task list serves is bounded: a step's output over
``[limits] max_step_output_bytes``, a result over ``max_result_bytes`` and a map over
``max_map_items`` fail their task naming the limit, and store nothing; the list serves
summaries whose size does not depend on what the tasks hold."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from orchestra.config import Settings
from orchestra.db import Database, TaskStore
from orchestra.db import reads as reads_module
from orchestra.db.reads import EngineReads, reads_for
from orchestra.domain import NewTask
from tests.conftest import Service, StartService, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import hostile_service

MiB = 1024 * 1024

#: The reproduction: 400 items of a million characters each (400 MB if it were kept).
HOARD = """\
name: hoard
steps:
  - id: parts
    kind: map
    over: range(400) | list
    step:
      kind: render
      text: "{{ 'a' * 999999 }}"
"""

#: Each step is under the step limit; the result repeats one 900 KB step ten times (9 MB).
BIG_RESULT = """\
name: big_result
steps:
  - id: part
    kind: render
    text: "{{ 'b' * 900000 }}"
output:
""" + "".join(f'  k{i}: "{{{{ steps.part.output }}}}"\n' for i in range(10))

#: Renders its parameter: a task as big as its params, twice (params and result).
ECHO = """\
name: echo
parameters:
  text: {type: string}
steps:
  - id: same
    kind: render
    text: "{{ params.text }}"
"""

BIG = """\
name: big
parameters:
  n: {type: integer}
steps:
  - id: small
    kind: render
    text: "fine"
  - id: large
    kind: render
    text: "{{ 'x' * params.n }}"
"""

MAPPED = """\
name: mapped
parameters:
  n: {type: integer}
steps:
  - id: each
    kind: map
    over: range(params.n) | list
    step:
      kind: render
      text: "{{ item }}"
"""

CHATTY = """\
name: chatty
model: llama3.2
steps:
  - id: answer
    prompt: "talk"
"""


def _files_mb(db: Path) -> float:
    """The database file and its WAL, in MiB."""
    paths = [db, db.with_name(db.name + "-wal")]
    return sum(p.stat().st_size for p in paths if p.exists()) / MiB


def _step_rows(db_url: str, task_id: int) -> dict[str, tuple[str, str | None, str | None]]:
    """A task's steps as stored: {step id: (status, output JSON, error JSON)}."""
    rows = sql_rows(
        db_url,
        "SELECT step_id, status, output, error FROM task_steps WHERE task_id = ?",
        (task_id,),
    )
    return {step: (status, output, error) for step, status, output, error in rows}


def _stored_result(db_url: str, task_id: int) -> str | None:
    [(result,)] = sql_rows(db_url, "SELECT result FROM tasks WHERE id = ?", (task_id,))
    return result if result is None else str(result)


async def _register(client: Any, *bodies: str) -> None:
    for body in bodies:
        response = await client.post("/api/v1/templates", content=body)
        assert response.status_code == 201, response.text


def _limited(settings: Settings, **limits: Any) -> Settings:
    return msgspec.structs.replace(
        settings, limits=msgspec.structs.replace(settings.limits, **limits)
    )


@pytest.fixture
async def small(settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    """A service with small output limits and the templates above registered."""
    limited = _limited(
        settings, max_step_output_bytes=10_000, max_result_bytes=20_000, max_map_items=10
    )
    async with start_service(limited) as svc:
        await _register(svc.client, BIG, MAPPED, CHATTY)
        yield svc


# -- the reproduction -----------------------------------------------------------------------
# hostile_service runs the service in its own process, on the test's database.


async def test_a_map_of_400_one_megabyte_items_fails_at_the_limit_and_stores_nothing(
    tmp_path: Path, fake_ollama: FakeOllama, db_url: str
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url, db_url=db_url) as svc:
        await _register(svc.client, HOARD)
        async with svc.watch() as watch:
            task = await svc.wait((await svc.submit("hoard"))["id"])
        watch.assert_held()
        assert task["status"] == "failed"
        assert task["error"]["step"] == "parts" and not task["error"].get("retryable")
        assert "[limits] max_step_output_bytes" in task["error"]["message"]
        assert "the limit is 1 MiB" in task["error"]["message"]
        assert len(task["attempts"]) == 1  # not retried: it would fail the same way
        [step] = task["steps"]
        assert step["status"] == "failed" and step["output"] is None
        assert task["result"] is None
        assert _step_rows(db_url, task["id"])["parts"][1] is None
        if db_url.startswith("sqlite"):
            assert _files_mb(tmp_path / "orchestra.db") < 50


async def test_a_result_over_the_limit_fails_the_task_and_is_not_stored(
    tmp_path: Path, fake_ollama: FakeOllama, db_url: str
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url, db_url=db_url) as svc:
        await _register(svc.client, BIG_RESULT)
        async with svc.watch() as watch:
            task = await svc.wait((await svc.submit("big_result"))["id"])
        watch.assert_held()
        assert task["status"] == "failed", task["error"]
        assert task["error"]["step"] == "output" and not task["error"].get("retryable")
        message = task["error"]["message"]
        assert "the task's result is 8.6 MiB" in message
        assert "the limit is 8 MiB ([limits] max_result_bytes)" in message
        assert task["result"] is None
        assert _stored_result(db_url, task["id"]) is None
        assert task["steps"][0]["status"] == "succeeded"  # 900 KB: under the step limit


async def test_the_task_list_serves_summaries_whatever_the_tasks_hold(
    tmp_path: Path, fake_ollama: FakeOllama, db_url: str
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url, db_url=db_url) as svc:
        await _register(svc.client, ECHO)
        text = "p" * 250_000  # under max_string_length; the task holds it twice (params, result)
        ids = [(await svc.submit("echo", text=text))["id"] for _ in range(60)]
        for task_id in ids:
            assert (await svc.wait(task_id))["status"] == "succeeded"
        async with svc.watch() as watch:
            # The reproduction's three requests.
            limit = {"limit": 500}
            pages = [await svc.client.get("/api/v1/tasks", params=limit) for _ in range(3)]
        watch.assert_held()
    for page in pages:
        assert page.status_code == 200
        items = page.json()["items"]
        assert [t["id"] for t in items] == sorted(ids, reverse=True)
        assert len(page.content) < 60 * 1000  # 30 MB with params and results
        for item in items:
            assert {"params", "result", "steps", "attempts"}.isdisjoint(item)
            assert item["status"] == "succeeded" and item["attempt"] == 1


# -- each limit -----------------------------------------------------------------------------


async def test_a_step_output_over_the_limit_fails_the_step_and_is_not_stored(
    small: Service, settings: Settings
) -> None:
    task = await small.wait((await small.submit("big", n=20_000))["id"])
    assert task["status"] == "failed"
    error = task["error"]
    assert error == {
        "type": "invalid_output",
        "message": "the step's output is 19.5 KiB; the limit is 9.8 KiB "
        "([limits] max_step_output_bytes)",
        "step": "large",
    }  # not retryable: it would fail the same way
    assert len(task["attempts"]) == 1
    steps = {s["id"]: s for s in task["steps"]}
    assert steps["small"]["output"] == "fine"
    assert steps["large"]["status"] == "failed" and steps["large"]["output"] is None
    stored = _step_rows(settings.database.url, task["id"])
    assert stored["large"][0] == "failed" and stored["large"][1] is None
    assert "max_step_output_bytes" in (stored["large"][2] or "")
    # At the limit, it passes: 9,998 characters and two quotes.
    fits = await small.wait((await small.submit("big", n=9_998))["id"])
    assert fits["status"] == "succeeded" and len(fits["result"]) == 9_998


async def test_just_over_the_limit_the_error_gives_exact_figures(small: Service) -> None:
    task = await small.wait((await small.submit("big", n=9_999))["id"])
    assert task["error"]["message"] == (
        "the step's output is 10,001 bytes; the limit is 10,000 bytes "
        "([limits] max_step_output_bytes)"
    )


async def test_a_map_within_its_limits_succeeds(small: Service) -> None:
    # 10 items of 4 digits and quotes: 71 bytes in all, fine; the limit applies to the total.
    ok = await small.wait((await small.submit("mapped", n=10))["id"])
    assert ok["status"] == "succeeded" and ok["result"] == [str(i) for i in range(10)]


async def test_a_map_over_more_items_than_the_limit_fails_naming_it(small: Service) -> None:
    task = await small.wait((await small.submit("mapped", n=11))["id"])
    assert task["status"] == "failed"
    assert task["error"]["type"] == "render_failed" and not task["error"].get("retryable")
    assert task["error"]["message"] == (
        "steps.each.over gives 11 items; the limit is 10 ([limits] max_map_items)"
    )


async def test_a_map_fails_as_its_items_outputs_pass_the_limit(
    settings: Settings, start_service: StartService
) -> None:
    limited = _limited(settings, max_step_output_bytes=1000)
    async with start_service(limited) as svc:
        await _register(svc.client, HOARD.replace("999999", "300"))
        task = await svc.wait((await svc.submit("hoard"))["id"])
    assert task["status"] == "failed"
    message = task["error"]["message"]
    # Four items of 302 bytes (and commas) pass 1,000 bytes: the other 396 never count.
    assert message == (
        "the step's output is 1.2 KiB or more (after 4 of 400 items); "
        "the limit is 1,000 bytes ([limits] max_step_output_bytes)"
    )


async def test_a_streamed_answer_over_the_limit_stops_and_is_not_kept(
    small: Service, fake_ollama: FakeOllama, settings: Settings
) -> None:
    fake_ollama.reply = lambda _body: "word " * 100_000  # 500 KB, one word a chunk
    task = await small.wait((await small.submit("chatty"))["id"])
    assert task["status"] == "failed"
    assert task["error"]["step"] == "answer" and not task["error"].get("retryable")
    message = task["error"]["message"]
    assert message.startswith("the step's streamed answer is 10,00")
    assert message.endswith(
        "bytes or more; the limit is 10,000 bytes ([limits] max_step_output_bytes)"
    )
    assert task["steps"][0]["output"] is None
    tokens = sql_rows(
        settings.database.url,
        "SELECT data FROM task_events WHERE task_id = ? AND type = 'step.tokens'",
        (task["id"],),
    )
    kept = sum(len(json.loads(data)["text"]) for (data,) in tokens)
    assert 0 < kept <= 10_000


# -- the list, in the store -----------------------------------------------------------------


async def test_the_list_query_reads_no_params_results_or_step_outputs(db: Database) -> None:
    store = TaskStore(db)
    for _ in range(3):
        await store.enqueue(NewTask(template="t", template_version=1, params={"x": "y" * 1000}))
    # Whatever the stored JSON holds, the list does not decode it, on either read path.
    sql_rows(db.url, "UPDATE tasks SET params = 'not json', result = 'not json either'")
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        assert len((await reads_for(db).page(None, None, 500, None)).items) == 3
        assert len((await EngineReads(db).page(None, None, 500, None)).items) == 3
        assert len((await store.list_page(limit=500)).items) == 3
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    one_statement = [*reads_module._SQLITE.pages.values(), *reads_module._POSTGRESQL.pages.values()]
    for sql in [" ".join(statements), *one_statement]:
        assert "FROM tasks" in sql
        for column in ("params", "result", "output", "prompt", "usage"):
            assert not re.search(rf"\b{column}\b", sql), sql


def test_the_task_list_schema_has_no_params_or_results() -> None:
    from orchestra.api.schemas import TaskList

    (_, components) = msgspec.json.schema_components([TaskList])
    summary = components["TaskSummaryOut"]["properties"]
    assert {"params", "result", "steps", "attempts"}.isdisjoint(summary)


async def test_a_model_name_too_long_to_list_is_refused(service: Service) -> None:
    body = {"template": "summarize", "params": {"text": "x"}, "model": "m" * 256}
    response = await service.client.post("/api/v1/tasks", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["fields"] == [
        {"field": "model", "message": "must be at most 255 characters"}
    ]
