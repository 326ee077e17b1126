"""What pages show, computed in Python: times, durations, JSON, and the throughput chart.

Everything here returns plain values or :class:`markupsafe.Markup` built with ``escape``, so a
value from a task (params, results, errors: anything a caller or a model wrote) is always
text in the page, never markup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from markupsafe import Markup, escape

#: The words and the look of each task status (a word always; colour only as a help).
STATUS_WORDS = ("queued", "running", "succeeded", "failed", "cancelled")


def when(value: str | None) -> Markup:
    """A ``<time>`` element: UTC in the page, shown in the reader's local time by the
    dashboard's script, with the ISO time on hover."""
    if not value:
        return Markup("&ndash;")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return Markup(escape(value))
    shown = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(value, shown)


def epoch(seconds: float | None) -> Markup:
    """A time given in seconds since the epoch, as :func:`when` shows it."""
    if seconds is None:
        return Markup("&ndash;")
    return when(datetime.fromtimestamp(seconds, UTC).isoformat())


def duration(ms: float | None) -> str:
    """Milliseconds as people read them: 850 ms, 3.2 s, 4 min 05 s, 23 h 59 min, 9 d 05 h,
    7,978 years."""
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    if days < 730:
        return f"{days} d {hours:02d} h"
    return f"{days // 365:,} years"


def age(iso_time: str | None, now: datetime) -> str:
    """How long ago ``iso_time`` was, in words (for the oldest queued task)."""
    if not iso_time:
        return "–"
    seconds = (now - datetime.fromisoformat(iso_time)).total_seconds()
    return duration(max(0.0, seconds) * 1000)


def until(iso_time: str | None, now: datetime) -> str | None:
    """How long until ``iso_time``, in words ("in 23 h 59 min"); None once it has come."""
    if not iso_time:
        return None
    seconds = (datetime.fromisoformat(iso_time) - now).total_seconds()
    if seconds <= 0:
        return None
    return "in " + duration(seconds * 1000 if seconds >= 1 else 1000)


#: Characters that reorder the text around them (Unicode's bidirectional embeddings,
#: overrides, isolates and marks): a value holding one would read as something it is not
#: ("desrever" for "reversed"), so pages show them as JSON escapes.
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPED = {code: f"\\u{code:04x}" for code in _BIDI}


def visible(text: str) -> str:
    """``text`` with its direction controls written as escapes (``\\u202e``)."""
    return text.translate(_ESCAPED)


def pretty(value: Any) -> str:
    """A value as it reads best: text as text, anything else as indented JSON; direction
    controls escaped either way."""
    if isinstance(value, str):
        return visible(value)
    return visible(json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False))


#: How much of a long value (params, a result, an output, a prompt, an error) a task's page
#: lays out: the whole of it is only in a closed ``<details>``, which the browser does not
#: lay out until it is opened (100 KB of right-to-left text in one narrow box took Chromium
#: most of a minute).
INLINE_CHARS = 10_000
#: The whole value, once opened, is written in pieces of about this many characters (inline
#: elements, so it reads and copies as one text): Chromium lays out a long text much faster
#: in pieces than as one text node.
PIECE_CHARS = 2_000


class Clipped(msgspec.Struct, frozen=True):
    """A value as a page shows it: ``head`` inline; when that is not all of it (``cut``), the
    whole of it behind "Show all", as ``pieces``, with its length and size as the page says
    them."""

    head: str
    cut: bool
    pieces: list[str]
    chars: str
    size: str


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` in consecutive pieces of at most ``size`` characters, each ending after a
    space or a line break where its last quarter has one (so no word is split there)."""
    out: list[str] = []
    start = 0
    while len(text) - start > size:
        end = start + size
        space = max(text.rfind(" ", end - size // 4, end), text.rfind("\n", end - size // 4, end))
        end = space + 1 if space >= 0 else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def clipped(text: str, limit: int = INLINE_CHARS) -> Clipped:
    """``text`` (already as shown: see :func:`pretty`) with at most ``limit`` characters to
    show inline, and the whole of it in :func:`pieces` when that is more."""
    cut = len(text) > limit
    kb = len(text.encode("utf-8", "surrogatepass")) / 1024
    return Clipped(
        head=text[:limit] + "…" if cut else text,
        cut=cut,
        pieces=pieces(text) if cut else [],
        chars=f"{len(text):,}",
        size=f"{kb:,.0f} KB" if kb >= 10 else f"{kb:,.1f} KB",
    )


def compact(value: Any, limit: int = 120) -> str:
    """A value on one line, cut at ``limit`` characters (for tables); direction controls
    escaped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = visible(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Bar(msgspec.Struct, frozen=True):
    """One minute of the throughput chart, in SVG units."""

    x: float
    minute: str
    succeeded: int
    failed: int
    ok_y: float
    ok_h: float
    bad_y: float
    bad_h: float


class Chart(msgspec.Struct, frozen=True):
    """Tasks succeeded and failed per minute, as bars to draw."""

    width: int
    height: int
    bar_width: float
    top: int
    bars: list[Bar]
    succeeded: int
    failed: int


def chart(minutes: Sequence[Any], width: int = 600, height: int = 120) -> Chart:
    """Stacked bars (succeeded below, failed above) for per-minute counts, oldest first.

    ``minutes`` are items with ``minute``, ``succeeded`` and ``failed``.
    """
    top = max([m.succeeded + m.failed for m in minutes] + [1])
    step = width / max(1, len(minutes))
    scale = (height - 4) / top
    bars = []
    for i, m in enumerate(minutes):
        ok_h = m.succeeded * scale
        bad_h = m.failed * scale
        bars.append(
            Bar(
                x=round(i * step, 2),
                minute=m.minute,
                succeeded=m.succeeded,
                failed=m.failed,
                ok_y=round(height - ok_h, 2),
                ok_h=round(ok_h, 2),
                bad_y=round(height - ok_h - bad_h, 2),
                bad_h=round(bad_h, 2),
            )
        )
    return Chart(
        width=width,
        height=height,
        bar_width=round(max(1.0, step - 1), 2),
        top=top,
        bars=bars,
        succeeded=sum(m.succeeded for m in minutes),
        failed=sum(m.failed for m in minutes),
    )


FILTERS = {
    "when": when,
    "epoch": epoch,
    "duration": duration,
    "pretty": pretty,
    "compact": compact,
    "visible": visible,
    "until": until,
    "clipped": clipped,
}
