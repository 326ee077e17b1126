"""Lines of a streamed body end only at CR LF, LF or CR (Server-Sent Events, JSON lines); a
long line costs time in proportion to its length, and a reader may bound it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from orchestra.lines import Lines, LineTooLong, aiter_lines, iter_lines


def split(*pieces: str) -> list[str]:
    lines = Lines()
    out = [line for piece in pieces for line in lines.feed(piece)]
    return out + lines.flush()


def test_unicode_line_separators_and_c0_controls_stay_inside_a_line() -> None:
    text = 'data: {"t": "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"}'
    assert split(text + "\n\n") == [text, ""]
    assert str.splitlines(text) != [text]  # what httpx's iter_lines did


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_cr_lf_cut_between_pieces_ends_one_line(cut: int) -> None:
    text = "id: 1\r\ndata: x\r\n\r\n"
    assert split(text[:cut], text[cut:]) == ["id: 1", "data: x", ""]


def test_cr_alone_and_lf_alone_end_lines_and_the_last_line_needs_no_end() -> None:
    assert split("a\rb\nc\r", "\rd") == ["a", "b", "c", "", "d"]
    assert split("a\r") == ["a"]
    assert split("") == []


def test_a_cr_ends_its_line_at_once_and_the_lf_after_it_ends_no_other() -> None:
    lines = Lines()
    assert lines.feed("data: x\r") == ["data: x"]  # not held until the next piece
    assert lines.feed("\ndata: y\r\n") == ["data: y"]
    assert lines.feed("\n") == [""]


def test_a_long_line_is_assembled_in_time_proportional_to_its_length() -> None:
    # 16 MiB without a line end, in 64 KiB pieces: each piece is searched once and the line
    # joined once. Joining the rest to each piece and searching it all again took 12 s.
    lines = Lines()
    piece = "x" * 65536
    started = time.perf_counter()
    for _ in range(256):
        assert lines.feed(piece) == []
    [line] = lines.feed("\n")
    took = time.perf_counter() - started
    assert len(line) == 256 * 65536
    assert took < 2


def test_a_line_longer_than_its_bound_fails_as_soon_as_it_passes_it() -> None:
    lines = Lines(max_chars=10)
    assert lines.feed("12345") == []
    with pytest.raises(LineTooLong) as failed:
        lines.feed("678901")  # no line end yet: the line is already too long
    assert failed.value.limit == 10
    assert str(failed.value) == "a line is longer than 10 characters"
    assert Lines(max_chars=10).feed("1234567890\nab") == ["1234567890"]  # at the bound: fine
    with pytest.raises(LineTooLong):
        Lines(max_chars=10).feed("12345678901\n")  # a finished line is held to it too
    split_line = Lines(max_chars=10)
    split_line.feed("123456")
    with pytest.raises(LineTooLong):
        split_line.feed("78901\nok\n")  # its pieces count together


class _Pieces(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A body that arrives in the given pieces."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces


def _response(*pieces: bytes, content_type: str = "application/x-ndjson") -> httpx.Response:
    return httpx.Response(200, headers={"content-type": content_type}, stream=_Pieces(*pieces))


#: "é" and "😀" cut inside their UTF-8 bytes, an invalid byte, no line end at the end.
PIECES = (b'{"t": "caf\xc3', b'\xa9"}\n{"t": "\xf0\x9f', b'\x98\x80 \xff"}')
EXPECTED = ['{"t": "café"}', '{"t": "😀 \ufffd"}']


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "text/plain; charset=latin-1"])
async def test_a_body_is_read_as_utf8_whatever_its_pieces_and_its_declared_charset(
    content_type: str,
) -> None:
    body = _response(*PIECES, content_type=content_type)
    assert [line async for line in aiter_lines(body)] == EXPECTED
    assert list(iter_lines(_response(*PIECES, content_type=content_type))) == EXPECTED


async def test_a_character_cut_at_the_very_end_is_replaced_not_lost() -> None:
    body = _response(b"ok\n", b"caf\xc3")
    assert [line async for line in aiter_lines(body)] == ["ok", "caf\ufffd"]
