"""Lines of a streamed body end only at CR LF, LF or CR (Server-Sent Events, JSON lines)."""

from __future__ import annotations

import pytest

from orchestra.lines import Lines


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
