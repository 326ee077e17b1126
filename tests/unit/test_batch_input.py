"""Reading an upload's rows: blank lines in a row are counted at once, and the rows after
them keep their line numbers; a quoted CSV cell keeps its blank lines."""

from __future__ import annotations

from collections.abc import AsyncIterator

from orchestra.batch_input import InputRow, csv_rows, jsonl_rows
from orchestra.templating.loader import parse_template

TEMPLATE = parse_template(
    """\
name: t
model: m
parameters:
  text: {type: string, required: true}
steps:
  - id: s
    prompt: "{{ params.text }}"
"""
)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(body), size):
        yield body[at : at + size]


async def _rows(rows: AsyncIterator[InputRow]) -> list[tuple[int, int, object, object]]:
    return [(r.row, r.line, r.params, r.problem) for r in [row async for row in rows]]


async def test_jsonl_rows_after_blank_lines_keep_their_line_numbers() -> None:
    body = b'\n\n{"text":"a"}\n' + b"\n" * 5000 + b'{"text":"b"}\nnot json\n\n'
    for size in (1, 7, 4096, len(body)):  # however the body arrives
        got = await _rows(jsonl_rows(_chunks(body, size), 1000))
        assert [(n, line, p) for n, line, p, _ in got] == [
            (1, 3, {"text": "a"}),
            (2, 5004, {"text": "b"}),
            (3, 5005, None),
        ], size
        assert str(got[2][3]).startswith("not JSON"), got


async def test_a_quoted_csv_cell_keeps_its_blank_lines_and_later_rows_their_numbers() -> None:
    body = b'text\n\n"a\n\n\nb"\n\n\n' + b"\n" * 3000 + b"c\n"
    for size in (1, 5, 4096, len(body)):
        got = await _rows(csv_rows(_chunks(body, size), 1000, TEMPLATE))
        assert [(n, line, p) for n, line, p, _ in got] == [
            (1, 3, {"text": "a\n\n\nb"}),
            (2, 3009, {"text": "c"}),
        ], size


async def test_a_quoted_csv_cell_of_blank_lines_over_the_limit_is_refused_and_reading_goes_on() -> (
    None
):
    body = b'text\n"' + b"\n" * 5000 + b'"\nafter\n'
    got = await _rows(csv_rows(_chunks(body, 4096), 1000, TEMPLATE))
    assert [(n, line) for n, line, _, _ in got] == [(1, 2), (2, 5003)]
    assert got[0][2] is None and "is over 1000 bytes" in str(got[0][3])
    assert got[1][2] == {"text": "after"}
