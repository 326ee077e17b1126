"""Reading a batch's upload as a stream: the rows of a JSON-lines or CSV body, each with its
row number (1: the first data row) and the line it starts on, holding no more than a row in
memory (:mod:`orchestra.batches` checks and queues them)."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from orchestra.errors import FieldProblem, InvalidRequest, PayloadTooLarge
from orchestra.templating.model import Template


class InputRow(msgspec.Struct, frozen=True):
    """One row read from an upload: its parameters, or why it could not be read."""

    row: int
    line: int
    params: dict[str, Any] | None
    problem: str | None = None


async def _lines(chunks: AsyncIterator[bytes], max_line: int) -> AsyncIterator[str]:
    """The body's text lines (UTF-8, a BOM dropped), newline kept, without holding more than
    one line; a line over ``max_line`` bytes is refused (413)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    pending = ""
    async for chunk in chunks:
        try:
            pending += decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise InvalidRequest("body: not UTF-8", [FieldProblem("body", str(exc))]) from None
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line + "\n"
        if len(pending) > max_line:
            raise PayloadTooLarge(f"a row is over {max_line} bytes")
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


async def jsonl_rows(chunks: AsyncIterator[bytes], max_line: int) -> AsyncIterator[InputRow]:
    """Rows of a JSON-lines body: one JSON object per line; blank lines are skipped."""
    number = 0
    async for index, line in _numbered(_lines(chunks, max_line)):
        if not line.strip():
            continue
        number += 1
        try:
            params = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            yield InputRow(number, index, None, f"not JSON: {exc}")
            continue
        if not isinstance(params, dict):
            yield InputRow(number, index, None, "is not a JSON object")
            continue
        yield InputRow(number, index, params)


async def _numbered(lines: AsyncIterator[str]) -> AsyncIterator[tuple[int, str]]:
    index = 0
    async for line in lines:
        index += 1
        yield index, line


async def csv_rows(
    chunks: AsyncIterator[bytes], max_line: int, template: Template
) -> AsyncIterator[InputRow]:
    """Rows of a CSV body: a header naming the parameters, then one record per row. A record
    may span lines (a quoted newline); it is complete when its quotes balance. Empty cells
    are left out (the template's default applies); cells are converted to the parameter's
    type where they read as one."""
    header: list[str] | None = None
    record, start, number = "", 0, 0
    async for index, line in _numbered(_lines(chunks, max_line)):
        if not record:
            start = index
        record += line
        if record.count('"') % 2:
            if len(record) > max_line:
                raise PayloadTooLarge(f"a row is over {max_line} bytes")
            continue  # a quoted newline: the record goes on
        text, record = record, ""
        if not text.strip():
            continue
        try:
            cells = next(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            if header is None:
                raise InvalidRequest(
                    f"body: the CSV header cannot be read: {exc}", [FieldProblem("body", str(exc))]
                ) from None
            number += 1
            yield InputRow(number, start, None, f"not CSV: {exc}")
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        number += 1
        if len(cells) != len(header):
            problem = f"has {len(cells)} cells; the header has {len(header)}"
            yield InputRow(number, start, None, problem)
            continue
        params = {
            name: _typed(cell, template, name)
            for name, cell in zip(header, cells, strict=True)
            if cell != ""
        }
        yield InputRow(number, start, params)
    if record:
        number += 1
        yield InputRow(number, start, None, "ends inside a quoted cell")


def _typed(cell: str, template: Template, name: str) -> Any:
    """A CSV cell as the parameter's type when it reads as one (else the text, which the
    parameter check then refuses with its reason)."""
    param = template.parameters.get(name)
    kind = param.type if param else "string"
    try:
        if kind == "integer":
            return int(cell)
        if kind == "number":
            return float(cell)
        if kind == "boolean":
            word = cell.strip().lower()
            if word in ("true", "1", "yes"):
                return True
            if word in ("false", "0", "no"):
                return False
        if kind in ("array", "object"):
            return msgspec.json.decode(cell)
    except (ValueError, msgspec.DecodeError):
        pass
    return cell
