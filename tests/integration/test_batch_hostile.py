"""Hostile batch uploads: bodies that cost the reader much and give it no row (millions of
blank lines, a quoted CSV cell of newlines) leave the service's loop free for other requests,
and a row nested too deeply to decode is a bad row like any other, the rest going on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from orchestra.config import Settings, TemplateSettings
from tests.conftest import Service, StartService
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import hostile_service

# -- bodies that are all skipping -----------------------------------------------------------
# The service runs in its own process (hostile_service), so a held loop is its, not the test's.

#: Lines read past without a row: the reader held the loop 2.5-3.6 s at a time over these.
BLANKS = 8_000_000


@pytest.mark.parametrize(
    ("fmt", "body", "read", "refused"),
    [
        ("jsonl", b"\n" * BLANKS + b'{"text":"x"}\n', 1, 0),
        # A quoted cell of newlines: one record over the row limit, read past, then a row.
        ("csv", b'text\n"' + b"\n" * BLANKS + b'"\nafter\n', 2, 1),
    ],
    ids=["jsonl-blank-lines", "csv-quoted-newlines"],
)
async def test_an_upload_of_lines_without_rows_leaves_the_service_answering(
    tmp_path: Path,
    fake_ollama: FakeOllama,
    db_url: str,
    fmt: str,
    body: bytes,
    read: int,
    refused: int,
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url, db_url=db_url) as svc:
        async with svc.watch() as watch:
            answer = await svc.client.post(
                "/api/v1/batches", params={"template": "sentiment", "format": fmt}, content=body
            )
        assert answer.status_code == 201, answer.text
        got = answer.json()
        assert (got["read"], got["refused"]) == (read, refused)
        watch.assert_held()


# -- a row nested too deeply ----------------------------------------------------------------

LISTJOB = """\
name: listjob
model: llama3.2
parameters:
  text: {type: string, required: true}
  items: {type: array}
steps:
  - id: answer
    prompt: "{{ params.text }}"
"""


@pytest.fixture
async def idle(
    settings: Settings, tmp_path: Path, start_service: StartService
) -> AsyncIterator[Service]:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "listjob.yaml").write_text(LISTJOB)
    settings = msgspec.structs.replace(
        settings,
        templates=TemplateSettings(dirs=[str(folder)]),
        server=msgspec.structs.replace(settings.server, workers=False),
    )
    async with start_service(settings) as service:
        yield service


async def upload(svc: Service, fmt: str, body: bytes) -> dict[str, Any]:
    answer = await svc.client.post(
        "/api/v1/batches", params={"template": "listjob", "format": fmt}, content=body
    )
    assert answer.status_code == 201, answer.text
    got: dict[str, Any] = answer.json()
    return got


async def test_a_jsonl_row_nested_too_deeply_is_refused_with_its_row_and_the_rest_go_on(
    idle: Service,
) -> None:
    deep = b'{"text":"d","items":' + b"[" * 2000 + b"]" * 2000 + b"}"
    body = b'{"text":"a"}\n{"text":"b","items":[[1]]}\n\n' + deep + b'\n{"text":"e"}\n'
    got = await upload(idle, "jsonl", body)
    assert (got["read"], got["refused"], got["batch"]["rows"]) == (4, 1, 4)
    assert got["batch"]["status"] == "loaded"
    [problem] = got["problems"]
    assert (problem["row"], problem["line"]) == (3, 4)
    assert "nests too deeply" in problem["message"], problem


async def test_a_csv_cell_nested_too_deeply_is_refused_with_its_row_and_the_rest_go_on(
    idle: Service,
) -> None:
    body = b"text,items\na,[1]\nb," + b"[" * 10000 + b'\nc,"[[2],[3]]"\nd,\n'
    got = await upload(idle, "csv", body)
    assert (got["read"], got["refused"], got["batch"]["rows"]) == (4, 1, 4)
    [problem] = got["problems"]
    assert (problem["row"], problem["line"]) == (2, 3)
    assert "nests too deeply" in problem["message"], problem
    assert "items" in str(problem), problem


# -- an upload broken midway by a bug -------------------------------------------------------


class Broken(Exception):
    """Not an error of Orchestra's: a bug, as the RecursionError above was."""


@contextmanager
def second_rows_write_breaks() -> Iterator[None]:
    """The second write of a chunk of batch rows raises :class:`Broken` (a bug's exception,
    from inside the storage layer)."""
    writes = 0

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal writes
        if statement.lstrip().upper().startswith("INSERT INTO BATCH_ROWS"):
            writes += 1
            if writes == 2:
                raise Broken("a bug")

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", before)


async def test_an_upload_broken_midway_by_a_bug_names_the_batch_and_the_rows_it_kept(
    idle: Service,
) -> None:
    """The rows read before are kept (closed: nobody could finish the batch), and the 500
    says so, lest the client send it all again as a second batch."""
    body = b"".join(b'{"text":"row %d"}\n' % i for i in range(1, 201))
    with second_rows_write_breaks():
        answer = await idle.client.post(
            "/api/v1/batches", params={"template": "listjob", "format": "jsonl"}, content=body
        )
    assert answer.status_code == 500, answer.text
    (batch,) = (await idle.client.get("/api/v1/batches")).json()["items"]
    assert batch["status"] == "loaded" and batch["rows"] == 50, batch
    error = answer.json()
    assert error["code"] == "internal", error
    assert f"batch {batch['id']} keeps the 50 rows read before" in error["message"], error
