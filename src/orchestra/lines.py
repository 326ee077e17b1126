"""Lines of a streamed HTTP body, ended only by CR LF, LF or CR.

Server-Sent Events (the WHATWG spec) and JSON lines end a line there and nowhere else. httpx's
``iter_lines`` splits as ``str.splitlines`` does: also at U+2028, U+2029, U+0085 and a few C0
controls. JSON does not escape the first three, so a model's token holding one of them cut its
JSON line in two there, and the call failed on JSON that was never broken (a model server that
writes such characters raw: llama.cpp's, Ollama's NEL). Orchestra's model providers, its
client and its tests read lines through this module instead.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator, Callable, Iterator

import httpx

_END = re.compile(r"\r\n|\r|\n")


class Lines:
    """Splits text that arrives in pieces into lines (without their ends).

    A piece that ends in CR keeps it until the next piece shows whether LF follows, so a CR LF
    cut between two pieces still ends one line.
    """

    def __init__(self) -> None:
        self._rest = ""

    def feed(self, text: str) -> list[str]:
        """The lines that ``text`` completes."""
        text = self._rest + text
        held = text.endswith("\r")
        if held:
            text = text[:-1]
        lines = _END.split(text)
        self._rest = lines.pop() + ("\r" if held else "")
        return lines

    def flush(self) -> list[str]:
        """The last line, when the text ended without a line end."""
        rest, self._rest = self._rest, ""
        if rest.endswith("\r"):
            return [rest[:-1]]
        return [rest] if rest else []


async def aiter_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a streamed response's body (see the module docstring), read as UTF-8."""
    lines = Lines()
    decode = _utf8()
    async for chunk in response.aiter_bytes():
        for line in lines.feed(decode(chunk)):
            yield line
    for line in lines.feed(decode(b"", True)) + lines.flush():
        yield line


def iter_lines(response: httpx.Response) -> Iterator[str]:
    """The lines of a streamed response's body, read synchronously, as UTF-8."""
    lines = Lines()
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
