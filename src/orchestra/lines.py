"""Lines of a streamed HTTP body, ended only by CR LF, LF or CR.

Server-Sent Events (the WHATWG spec) and JSON lines end a line there and nowhere else. httpx's
``iter_lines`` splits as ``str.splitlines`` does: also at U+2028, U+2029, U+0085 and a few C0
controls. JSON does not escape the first three, so a model's token holding one of them cut its
JSON line in two there, and the call failed on JSON that was never broken (a model server that
writes such characters raw: llama.cpp's, Ollama's NEL). Orchestra's model providers, its
client and its tests read lines through this module instead.

A line is assembled in time proportional to its length, however many pieces it comes in: each
piece is searched once, for the line ends it holds, and the pieces of an unfinished line are
kept in a list and joined once the line ends. A reader may bound a line's length
(``max_chars``): a longer line raises :class:`LineTooLong` as soon as it passes the bound,
instead of growing in memory until the body ends.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator, Callable, Iterator

import httpx

_END = re.compile(r"\r\n|\r|\n")


class LineTooLong(ValueError):
    """A line is longer than its reader allows (the rest of it is not read)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"a line is longer than {limit:,} characters")


class Lines:
    """Splits text that arrives in pieces into lines (without their ends).

    A CR ends its line at once; an LF right after it, even at the start of the next piece, is
    part of the same line end (CR LF), not an empty line.
    """

    def __init__(self, max_chars: int | None = None) -> None:
        """``max_chars``: the longest line accepted, in characters (None: no bound)."""
        self.max_chars = max_chars
        #: The unfinished line: its pieces, and their length together.
        self._pieces: list[str] = []
        self._length = 0
        #: The last piece ended in CR: an LF that starts the next one belongs to it.
        self._after_cr = False

    def feed(self, text: str) -> list[str]:
        """The lines that ``text`` completes.

        Raises:
            LineTooLong: a line (finished or not) is longer than ``max_chars``.
        """
        if not text:
            return []
        if self._after_cr:
            self._after_cr = False
            if text[0] == "\n":
                text = text[1:]
        if "\n" not in text and "\r" not in text:
            lines, rest = [], text  # the common case of a long line: no regex at all
        else:
            lines = _END.split(text)  # only the new piece is searched
            rest = lines.pop()
        if lines:
            if self._pieces:
                self._pieces.append(lines[0])
                lines[0] = "".join(self._pieces)
                self._pieces, self._length = [], 0
            self._after_cr = text.endswith("\r")
            limit = self.max_chars
            if limit is not None and any(len(line) > limit for line in lines):
                raise LineTooLong(limit)
        if rest:
            self._pieces.append(rest)
            self._length += len(rest)
            if self.max_chars is not None and self._length > self.max_chars:
                raise LineTooLong(self.max_chars)
        return lines

    def flush(self) -> list[str]:
        """The last line, when the text ended without a line end."""
        rest = "".join(self._pieces)
        self._pieces, self._length, self._after_cr = [], 0, False
        return [rest] if rest else []


async def aiter_lines(response: httpx.Response, max_chars: int | None = None) -> AsyncIterator[str]:
    """The lines of a streamed response's body (see the module docstring), read as UTF-8.

    Raises:
        LineTooLong: a line is longer than ``max_chars`` (None: no bound).
    """
    lines = Lines(max_chars)
    decode = _utf8()
    async for chunk in response.aiter_bytes():
        for line in lines.feed(decode(chunk)):
            yield line
    for line in lines.feed(decode(b"", True)) + lines.flush():
        yield line


def iter_lines(response: httpx.Response, max_chars: int | None = None) -> Iterator[str]:
    """The lines of a streamed response's body, read synchronously, as UTF-8.

    Raises:
        LineTooLong: a line is longer than ``max_chars`` (None: no bound).
    """
    lines = Lines(max_chars)
    decode = _utf8()
    for chunk in response.iter_bytes():
        yield from lines.feed(decode(chunk))
    yield from lines.feed(decode(b"", True))
    yield from lines.flush()


def _utf8() -> Callable[..., str]:
    """An incremental UTF-8 decoder (a character cut between two pieces is decoded once the
    rest arrives; bytes that are no UTF-8 become U+FFFD, as httpx's text does).

    Both formats read here are UTF-8 whatever the Content-Type says (Server-Sent Events by
    the WHATWG spec, JSON lines by RFC 8259), so the body is not decoded as httpx's
    ``iter_text`` would, by a charset parsed from the Content-Type of every response; that
    parse cost about a tenth of a streamed model call's CPU."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode
