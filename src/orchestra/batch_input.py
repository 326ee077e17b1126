"""Reading a batch's upload as a stream: the rows of a JSON-lines or CSV body, each with its
row number (1: the first data row) and the line it starts on, holding no more than a row in
memory (:mod:`orchestra.batches` checks and queues them)."""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from orchestra.errors import FieldProblem, InvalidRequest, PayloadTooLarge
from orchestra.templating.model import Template

#: How long reading (and checking) an upload holds the event loop before it lets others run:
#: a body arrives faster than it is read, so nothing else would (a body of millions of blank
#: lines, which make no row, held it for seconds at a time).
TURN_SECONDS = 0.002
#: The most characters of a chunk split into lines at once (a slice of blank lines is this
#: many lines: a few milliseconds).
SLICE_CHARS = 65_536


class InputRow(msgspec.Struct, frozen=True):
    """One row read from an upload: its parameters, or why it could not be read."""

    row: int
    line: int
    params: dict[str, Any] | None
    problem: str | None = None


class Overlong(msgspec.Struct, frozen=True):
    """A line over the row limit, read past without being held: only its count of ``"``
    is kept (a CSV record's quotes may balance on a later line)."""

    quotes: int


class Blank(msgspec.Struct, frozen=True):
    """``count`` blank lines in a row, given at once: a body of millions of them (which make
    no row) was read one line at a time, seconds of the event loop's thread."""

    count: int


class _Splitter:
    """Text cut into lines as it arrives; a line over ``max_line`` characters becomes an
    :class:`Overlong` as soon as it is known to be one, and the rest of it is skipped."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.pending = ""
        #: The quotes of the over-long line being skipped (None: none is).
        self.skipping: int | None = None

    def feed(self, text: str) -> Iterator[str | Overlong | Blank]:
        """The lines ``text`` completes, one at a time (a chunk may hold a million of them),
        blank lines in a row as one :class:`Blank`: the rest is kept for the next chunk once
        they have all been taken."""
        pieces = text.split("\n")
        rest = pieces.pop()
        at, end = 0, len(pieces)
        while at < end:
            piece = pieces[at]
            at += 1
            if self.skipping is not None:
                yield Overlong(self.skipping + piece.count('"'))
                self.skipping = None
                continue
            line, self.pending = self.pending + piece, ""
            if not line:
                run = 1
                while at < end and not pieces[at]:
                    at += 1
                    run += 1
                yield Blank(run)
                continue
            yield Overlong(line.count('"')) if len(line) > self.max_line else line + "\n"
        if self.skipping is not None:
            self.skipping += rest.count('"')
        else:
            self.pending += rest
            if len(self.pending) > self.max_line:
                self.skipping, self.pending = self.pending.count('"'), ""

    def end(self) -> list[str | Overlong | Blank]:
        if self.skipping is not None:
            return [Overlong(self.skipping)]
        return [self.pending] if self.pending else []


#: What a row nested too deeply to decode is told (msgspec stops past about a thousand levels,
#: Python's recursion limit, counted from where it is called).
TOO_DEEP = "nests too deeply (over about 1,000 levels of arrays and objects)"


class _TooDeep(Exception):
    """A CSV cell nested too deeply to decode as its parameter's JSON."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def over_limit(max_line: int) -> str:
    """What a refused over-long row is told."""
    return f"is over {max_line} bytes (the limit of a row: [limits] max_body_bytes)"


async def _lines(
    chunks: AsyncIterator[bytes], max_line: int
) -> AsyncIterator[str | Overlong | Blank]:
    """The body's text lines (UTF-8, a BOM dropped), newline kept, without holding more than
    one line: a line over ``max_line`` bytes comes as an :class:`Overlong`, unread, blank
    lines in a row as one :class:`Blank`. Every
    :data:`TURN_SECONDS` it steps aside for one turn of the event loop, whether or not its
    lines make rows (the chunks are ready as fast as they are read, and blank lines, or a
    quoted cell's, reach no awaited write).

    Raises:
        InvalidRequest: the body stops being UTF-8 (a bad byte, or a body cut inside a
            character): every line before it was given, and the error names its line and
            its byte offset in the body.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    splitter = _Splitter(max_line)
    read = 0  # bytes of the body before this chunk
    newlines = 0
    turn = time.perf_counter()
    async for chunk, final in _ended(chunks):
        try:
            text = decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            # The lines before the bad byte's are rows like any other; then the error, with
            # where the byte is in the body (``exc.object`` ends where the chunk ends).
            before = exc.object[: exc.start].decode("utf-8")
            for line in splitter.feed(before):
                yield line
            offset = read + len(chunk) - (len(exc.object) - exc.start)
            where = f"line {newlines + before.count(chr(10)) + 1}"
            raise InvalidRequest(
                f"body: not UTF-8 at {where} (byte offset {offset:,} in the body: "
                f"0x{exc.object[exc.start]:02x})",
                [FieldProblem("body", f"not UTF-8 at {where}")],
            ) from None
        read += len(chunk)
        newlines += text.count("\n")
        # A chunk is split a slice at a time: split whole, a chunk of megabytes of blank
        # lines was one call that held the loop for most of a second.
        for at in range(0, len(text), SLICE_CHARS):
            for line in splitter.feed(text[at : at + SLICE_CHARS]):
                if time.perf_counter() - turn > TURN_SECONDS:
                    await asyncio.sleep(0)
                    turn = time.perf_counter()
                yield line
    for line in splitter.end():
        yield line


async def _ended(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bool]]:
    """Each chunk, then an empty last one marked final (a decoder's end)."""
    async for chunk in chunks:
        yield chunk, False
    yield b"", True


async def jsonl_rows(chunks: AsyncIterator[bytes], max_line: int) -> AsyncIterator[InputRow]:
    """Rows of a JSON-lines body: one JSON object per line; blank lines are skipped."""
    number = 0
    async for index, line in _numbered(_lines(chunks, max_line)):
        if isinstance(line, Blank):
            continue
        if isinstance(line, Overlong):
            number += 1
            yield InputRow(number, index, None, over_limit(max_line))
            continue
        if not line.strip():
            continue
        number += 1
        try:
            params = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            yield InputRow(number, index, None, f"not JSON: {exc}")
            continue
        except RecursionError:  # a bad row like any other, not the whole body's error
            yield InputRow(number, index, None, TOO_DEEP)
            continue
        if not isinstance(params, dict):
            yield InputRow(number, index, None, "is not a JSON object")
            continue
        yield InputRow(number, index, params)


async def _numbered(
    lines: AsyncIterator[str | Overlong | Blank],
) -> AsyncIterator[tuple[int, str | Overlong | Blank]]:
    """Each line with its number (a :class:`Blank` with its last line's)."""
    index = 0
    async for line in lines:
        index += line.count if isinstance(line, Blank) else 1
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
    quotes, over = 0, False  # the record's quotes so far; whether it is over the limit
    async for index, line in _numbered(_lines(chunks, max_line)):
        if isinstance(line, Blank):
            # Outside a record, nothing (each line ends a record whose quotes balance);
            # inside a quoted cell, its newlines.
            if quotes % 2 and not over:
                if len(record) + line.count > max_line:
                    record, over = "", True
                else:
                    record += "\n" * line.count
            continue
        if not record and not over:
            start = index
        if isinstance(line, Overlong):
            quotes, record, over = quotes + line.quotes, "", True
        else:
            quotes += line.count('"')
            if not over:
                record += line
                if len(record) > max_line:
                    record, over = "", True
        if quotes % 2:
            continue  # a quoted newline: the record goes on
        text, record, quotes = record, "", 0
        if over:
            over = False
            if header is None:
                why = f"the CSV header {over_limit(max_line)}"
                raise PayloadTooLarge(why, [FieldProblem("body", why)])
            number += 1
            yield InputRow(number, start, None, over_limit(max_line))
            continue
        if not text.strip():
            continue
        try:
            cells = next(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            why = _csv_problem(exc)
            if header is None:
                raise InvalidRequest(
                    f"body: the CSV header cannot be read: {why}", [FieldProblem("body", why)]
                ) from None
            number += 1
            yield InputRow(number, start, None, f"not CSV: {why}")
            continue
        if header is None:
            header = _header(cells)
            continue
        number += 1
        if len(cells) != len(header):
            problem = (
                f"has {len(cells)} cell{'' if len(cells) == 1 else 's'}; "
                f"the header has {len(header)}"
            )
            yield InputRow(number, start, None, problem)
            continue
        unnamed = next(
            (i for i, (n, c) in enumerate(zip(header, cells, strict=True)) if c and not n), None
        )
        if unnamed is not None:
            problem = (
                f"cell {unnamed + 1} has a value, but the header names no column {unnamed + 1}"
            )
            yield InputRow(number, start, None, problem)
            continue
        try:
            params = {
                name: _typed(cell, template, name)
                for name, cell in zip(header, cells, strict=True)
                if cell != ""
            }
        except _TooDeep as exc:
            yield InputRow(number, start, None, f"column {exc.name!r} {TOO_DEEP}")
            continue
        yield InputRow(number, start, params)
    if record or over:
        number += 1
        yield InputRow(number, start, None, "ends inside a quoted cell")


def _csv_problem(exc: csv.Error) -> str:
    """Why a record is not CSV, in a reader's words rather than Python's csv module's."""
    if "new-line character seen in unquoted field" in str(exc):
        # Lines are split at LF: a file whose lines end with CR alone is one long line.
        return (
            "a carriage return (CR) outside quotes: lines must end with LF or CRLF, and a "
            "cell holding a line break must be quoted"
        )
    return str(exc)


def _header(cells: list[str]) -> list[str]:
    """The CSV header's parameter names.

    Raises:
        InvalidRequest: a name is given twice (one of the two cells would be lost); unnamed
            columns may repeat.
    """
    names = [c.strip() for c in cells]
    # Unnamed columns (a spreadsheet's trailing "a,b,,") are no parameter: a row with a value
    # in one is refused, saying which cell.
    twice = sorted({n for n in names if n and names.count(n) > 1})
    if twice:
        problem = f"the CSV header names {', '.join(repr(n) for n in twice)} more than once"
        raise InvalidRequest(f"body: {problem}", [FieldProblem("body", problem)])
    return names


def _typed(cell: str, template: Template, name: str) -> Any:
    """A CSV cell as the parameter's type when it reads as one (else the text, which the
    parameter check then refuses with its reason).

    Raises:
        _TooDeep: an array or object cell nested too deeply to decode.
    """
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
    except RecursionError:
        raise _TooDeep(name) from None
    return cell
