"""A batch's results as a download: JSON lines (each row as it is) or CSV (a result object
spread over columns, text a spreadsheet would run as a formula made plain text). The API's
``GET /api/v1/batches/{id}/results`` and the dashboard's download both answer with it."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.response import Stream

from orchestra.batch_model import Format
from orchestra.batches import BatchService
from orchestra.db.batches import ResultRow

_encode = msgspec.json.Encoder().encode


class Download(Stream):
    """A stream whose own media type wins over its route's: Litestar (2.x) gives the route's
    ``media_type`` (the API's documents JSON lines) precedence over the response's, so CSV
    went out as ``application/x-ndjson``."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = None
        return super().to_asgi_response(*args, **kwargs)


async def results_stream(batches: BatchService, batch_id: int, chosen: Format) -> Stream:
    """The batch's rows in input order, as ``chosen`` (CSV as an attachment named after the
    batch).

    Raises:
        BatchNotFound: no batch has this id.
    """
    pages = await batches.results(batch_id)
    if chosen == "csv":
        keys = await _result_keys(await batches.results(batch_id))
        return Download(
            _csv(pages, keys),
            media_type="text/csv",  # the charset is added to a text type
            headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.csv"'},
        )
    return Download(_jsonl(pages), media_type="application/x-ndjson")


def _outcome(r: ResultRow) -> tuple[str, Any, Any]:
    """A row's status, result and error, decoded."""
    if r.status is None:
        refused = msgspec.json.decode(r.refused) if r.refused else None
        return ("invalid" if refused else "deleted"), None, refused
    result = msgspec.json.decode(r.result) if r.result else None
    error = msgspec.json.decode(r.error) if r.error else None
    return r.status, result, error


async def _jsonl(pages: AsyncIterator[list[ResultRow]]) -> AsyncIterator[bytes]:
    async for page in pages:
        lines = []
        for r in page:
            status, result, error = _outcome(r)
            row = {"row": r.row, "line": r.line, "status": status}
            lines.append(_encode({**row, "result": result, "error": error}))
        yield b"\n".join(lines) + b"\n"


async def _result_keys(pages: AsyncIterator[list[ResultRow]]) -> list[str]:
    """The keys of the result objects, in first-seen order (at most 200 columns)."""
    keys: dict[str, None] = {}
    async for page in pages:
        for r in page:
            if r.result and r.result.startswith("{") and len(keys) < 200:
                for key in msgspec.json.decode(r.result):
                    keys.setdefault(key, None)
    return list(keys)


#: What a spreadsheet takes for the start of a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A value as a CSV cell: text as text, anything else as JSON. Text that a spreadsheet
    would run as a formula (a model's answer is text from outside) gets a leading apostrophe,
    which spreadsheets read as "this is text"; JSON lines carry values as they are."""
    if value is None:
        return ""
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_START) else value
    return _encode(value).decode()


def error_text(error: Any) -> str:
    """A row's error (a task's, or a refusal) as one line of text: the step it failed in, its
    message, and each refused field with why."""
    if not isinstance(error, dict):
        return "" if error is None else str(error)
    text = str(error.get("message", ""))
    if error.get("step"):
        text = f"step {error['step']}: {text}"
    fields = [f"{f.get('field')}: {f.get('message')}" for f in error.get("fields") or ()]
    return ": ".join([text, "; ".join(fields)]) if fields else text


def _error_cell(error: Any) -> str:
    """A row's error as one cell (what the JSON line carries, for a reader of a
    spreadsheet): see :func:`error_text`."""
    return _cell(error if not isinstance(error, dict) else error_text(error))


async def _csv(pages: AsyncIterator[list[ResultRow]], keys: list[str]) -> AsyncIterator[bytes]:
    header = ["row", "line", "status", "error", "result", *(f"result.{k}" for k in keys)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    async for page in pages:
        for r in page:
            status, result, error = _outcome(r)
            spread = result if isinstance(result, dict) else {}
            rest = {k: v for k, v in spread.items() if k not in keys}
            whole = result if not isinstance(result, dict) else (rest or None)
            writer.writerow(
                [r.row, r.line, status, _error_cell(error), _cell(whole)]
                + [_cell(spread.get(k)) for k in keys]
            )
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()
