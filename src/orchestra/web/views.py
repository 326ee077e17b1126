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
    """Milliseconds as people read them: 850 ms, 3.2 s, 4 min 05 s."""
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
    return f"{hours} h {minutes:02d} min"


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
}
