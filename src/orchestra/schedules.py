"""Schedules: a template run again and again, on a cron expression or every so often.

Pure logic, no storage: the shapes a schedule is asked for in (:class:`ScheduleSpec`, and
:class:`ScheduleChanges` for a PATCH), the stored :class:`Schedule`, when its ticks fall
(:func:`next_after`, :func:`upcoming`) and what a due schedule does now (:func:`plan`).

Times are zoned datetimes; the stored ones are ISO-8601 UTC text (:func:`~orchestra.domain.iso`),
and a tick's text is its identity (the ``schedule_fires`` key), so a tick is computed the same
way by every process: ``every`` ticks from the schedule's ``created_at`` in whole microseconds
(``created_at + k * every``: they never drift), cron ticks by cronsim in the schedule's time
zone (DST as Debian's cron: a time that does not exist that day runs when the clocks jump
past it, a time that exists twice runs once; ``0 * * * *`` runs every real hour).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import msgspec
from cronsim import CronSim, CronSimError

from orchestra.errors import FieldProblem, InvalidRequest, NotFoundError, OrchestraError

#: A name is a word (not a number, so a path segment is an id or a name, never both).
NAME_PATTERN = "^[A-Za-z][A-Za-z0-9_.-]{0,99}$"
#: The shortest and longest ``every``.
MIN_EVERY_SECONDS = 1.0
MAX_EVERY_SECONDS = 366 * 86_400.0
#: How many ticks a cron expression may be looked ahead for one answer (a cron that never
#: fires, like ``0 0 30 2 *``, is refused at creation).
_MAX_STEPS = 100_000
#: How far before the last tick found backwards the forward walk starts: more than any
#: daylight saving shift, and wider when the forward reading has no tick in that stretch (a
#: tick the backward reading finds in a repeated hour, that the forward one does not fire).
_SLACKS = (timedelta(hours=3), timedelta(days=2), timedelta(days=40), timedelta(days=800))

Overlap = Literal["skip", "allow"]
CatchUp = Literal["none", "latest"]
Source = Literal["api", "config"]


class ScheduleNotFound(NotFoundError):
    """No schedule has this name or id."""

    code = "schedule_not_found"


class TimingUnusable(OrchestraError):
    """This host cannot compute the schedule's ticks.

    Its timing was checked where it was made, but this host reads it otherwise: its tzdata
    lacks the time zone (hosts sharing one database, a name like ``US/Eastern`` dropped by an
    OS upgrade), or the installed cronsim refuses the expression. The message says which.
    """

    code = "timing_unusable"


class TaskOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What each task a schedule makes gets, beyond its template's defaults."""

    max_attempts: (
        Annotated[
            int,
            msgspec.Meta(ge=1, le=100, description="Attempts allowed (overrides the template)."),
        ]
        | None
    ) = None
    timeout: (
        Annotated[float, msgspec.Meta(gt=0, le=86_400, description="Seconds one attempt may take.")]
        | None
    ) = None


# As a task's (orchestra.tasks.Priority; config.py reads this module, so it cannot import that).
Priority = Annotated[
    int, msgspec.Meta(ge=-1000, le=1000, description="Higher runs first; -1000 to 1000.")
]
_Name = Annotated[
    str, msgspec.Meta(pattern=NAME_PATTERN, description="Unique; letters, digits, _ . -")
]
_Template = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
_Model = Annotated[
    str, msgspec.Meta(min_length=1, max_length=255, description="Instead of the template's.")
]
_Cron = Annotated[
    str, msgspec.Meta(max_length=200, description="5 fields: minute hour day month weekday.")
]
_Zone = Annotated[str, msgspec.Meta(min_length=1, max_length=64, description="IANA time zone.")]
_Every = (
    Annotated[
        str,
        msgspec.Meta(
            max_length=32, description='A duration: "2s", "5m", "1h30m", "1d" (at least 1s).'
        ),
    ]
    | Annotated[float, msgspec.Meta(description="A number of seconds (at least 1).")]
)


def _every_text(value: Any) -> Any:
    """A number of seconds (or a ``timedelta``) as the duration text schedules keep (3600 ->
    "3600")."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        # Every digit as written and no exponent (``:g`` kept six digits: 2592000 became
        # "2.592e+06", refused, and 123456.7 became 123457).
        text = format(Decimal(repr(value)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value) if isinstance(value, float) else value


class ScheduleSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A schedule as it is asked for: the body of ``POST /api/v1/schedules``, or one
    ``[[schedules]]`` entry of orchestra.toml. Give ``cron`` or ``every``, not both."""

    name: _Name
    template: _Template
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    model: _Model | None = None
    priority: Priority = 0
    options: TaskOptions = msgspec.field(default_factory=TaskOptions)
    cron: _Cron | None = None
    timezone: _Zone = "UTC"
    every: _Every | None = None
    enabled: bool = True
    #: skip: a tick while this schedule's previous task is unfinished makes no task.
    overlap: Overlap = "skip"
    #: After downtime: none (skip the missed ticks), latest (one task for them).
    catch_up: CatchUp = "none"

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "every", _every_text(self.every))


class ScheduleChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a PATCH: the fields to change (``null`` clears ``cron``, ``every`` and
    ``model``)."""

    name: _Name | msgspec.UnsetType = msgspec.UNSET
    template: _Template | msgspec.UnsetType = msgspec.UNSET
    params: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    model: _Model | None | msgspec.UnsetType = msgspec.UNSET
    priority: Priority | msgspec.UnsetType = msgspec.UNSET
    options: TaskOptions | msgspec.UnsetType = msgspec.UNSET
    cron: _Cron | None | msgspec.UnsetType = msgspec.UNSET
    timezone: _Zone | msgspec.UnsetType = msgspec.UNSET
    every: _Every | None | msgspec.UnsetType = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET
    overlap: Overlap | msgspec.UnsetType = msgspec.UNSET
    catch_up: CatchUp | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "every", _every_text(self.every))

    def given(self) -> dict[str, Any]:
        """The fields the body names, with their values."""
        return {
            f: getattr(self, f)
            for f in self.__struct_fields__
            if getattr(self, f) is not msgspec.UNSET
        }

    def apply(self, spec: ScheduleSpec) -> ScheduleSpec:
        """``spec`` with these changes."""
        return msgspec.structs.replace(spec, **self.given())


class Timing(msgspec.Struct, frozen=True):
    """When a schedule's ticks fall: a cron expression in a zone, or a period in seconds
    counted from ``anchor``."""

    cron: str | None
    timezone: str
    every_seconds: float | None
    anchor: datetime

    def zone(self) -> ZoneInfo:
        """The zone the cron expression is read in.

        Raises:
            TimingUnusable: this host does not know it.
        """
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder ("America")
            raise TimingUnusable(f"time zone {self.timezone!r} is not known on this host") from None

    def cron_ticks(self, start: datetime, *, reverse: bool = False) -> Iterator[datetime]:
        """cronsim's ticks of the cron expression from ``start``, read in the zone (later
        ones, or with ``reverse`` earlier ones).

        Raises:
            TimingUnusable: this host cannot read the zone or the expression.
        """
        zone = self.zone()
        try:
            ticks = CronSim(self.cron or "", start.astimezone(zone), reverse=reverse)
            while True:
                yield next(ticks)
        except (CronSimError, ValueError, KeyError, IndexError, StopIteration) as exc:
            raise TimingUnusable(
                f"cron {self.cron!r} cannot be read on this host: {exc or type(exc).__name__}"
            ) from None


class Schedule(msgspec.Struct, frozen=True):
    """A stored schedule. ``next_fire_at`` is its next tick (None while it is paused)."""

    id: int
    spec: ScheduleSpec
    every_seconds: float | None
    next_fire_at: str | None
    source: Source
    created_at: str
    updated_at: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def timing(self) -> Timing:
        return Timing(
            self.spec.cron, self.spec.timezone, self.every_seconds, parse_time(self.created_at)
        )


class Plan(msgspec.Struct, frozen=True):
    """What a due schedule does now: fire the tick ``fire_at`` (None: fire nothing, the
    ticks up to now were missed), then wait for ``next_at``. ``missed``: the ticks missed
    (the service was down) as a range, from the first of them to the tick before which they
    end (the one that fires, or the next one), when any were."""

    fire_at: datetime | None
    next_at: datetime
    missed: tuple[datetime, datetime] | None = None


def parse_time(text: str) -> datetime:
    """A stored time (ISO-8601 with a zone) as a zoned datetime."""
    return datetime.fromisoformat(text).astimezone(UTC)


_EVERY = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")


def _shown(text: str, most: int = 40) -> str:
    """``text`` quoted for an error message, cut at ``most`` characters (a 309-digit number
    is not repeated back whole)."""
    return repr(text if len(text) <= most else text[: most - 1] + "…")


def parse_every(text: str) -> float:
    """Seconds from a duration like ``2s``, ``5m``, ``1h30m``, ``1d`` or ``90`` (seconds).

    Raises:
        ValueError: not such a duration, or outside 1 s to 366 days.
    """
    raw = text.strip().lower()
    match = _EVERY.fullmatch(raw)
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        seconds = float(raw)
    elif raw and match:
        units = {"d": 86_400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
        seconds = sum(float(match.group(u) or 0) * f for u, f in units.items())
    else:
        raise ValueError(
            f'expected a duration like "2s", "5m", "1h30m" or "1d", not {_shown(text)}'
        )
    if not MIN_EVERY_SECONDS <= seconds <= MAX_EVERY_SECONDS:
        raise ValueError(f"must be between 1s and 366d, not {_shown(text)}")
    return seconds


def format_every(seconds: float) -> str:
    """A period as ``parse_every`` reads it: 5400.0 -> ``1h30m``; to the microsecond it
    ticks at (``2.000001s``; ``:g`` kept six digits, and showed ``2s``)."""
    whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m")) if n)
    if secs or micros or not text:
        text += f"{secs}.{micros:06d}".rstrip("0").rstrip(".") + "s"
    return text


def check(spec: ScheduleSpec) -> float | None:
    """Check a spec's timing; returns its ``every`` in seconds (None for a cron).

    Raises:
        InvalidRequest: naming each bad field (cron, every, timezone) and why.
    """
    problems: list[FieldProblem] = []
    every: float | None = None
    if (spec.cron is None) == (spec.every is None):
        problems.append(FieldProblem("cron", "give cron or every (exactly one of them)"))
    zone = time_zone(spec.timezone)
    if zone is None:
        problems.append(FieldProblem("timezone", _zone_problem(spec.timezone)))
    if spec.every is not None:
        try:
            every = parse_every(str(spec.every))  # text after __post_init__
        except ValueError as exc:
            problems.append(FieldProblem("every", str(exc)))
    if spec.cron is not None:
        why = _cron_problem(spec.cron, zone or UTC)
        if why:
            problems.append(FieldProblem("cron", why))
    if problems:
        raise InvalidRequest("; ".join(f"{p.field}: {p.message}" for p in problems), problems)
    return every


@functools.cache
def _iana_names() -> frozenset[str]:
    """The IANA time zone names this host knows (the system's database, else the tzdata
    package's). Not ``localtime``: zoneinfo finds that file beside the zones, and it is the
    host's own zone, whatever that is."""
    return frozenset(available_timezones()) - {"localtime"}


def time_zone(name: str) -> ZoneInfo | None:
    """The zone an IANA name (``Europe/Paris``, ``UTC``) names; None for any other name,
    also for the zoneinfo keys that are files of the host rather than IANA names
    (``localtime``, ``posixrules``, ``posix/Europe/Paris``, ``right/UTC``), whose meaning
    depends on the host."""
    if name not in _iana_names():
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _zone_problem(name: str) -> str:
    """Why ``name`` is refused as a time zone, with a name that would do."""
    problem = f"{name!r} is not an IANA time zone name: use one like Europe/Paris"
    head, _, rest = name.partition("/")
    if head in ("posix", "right") and rest in _iana_names():
        problem += f" (here: {rest})"
    return problem


def _cron_problem(expr: str, zone: Any) -> str | None:
    """Why ``expr`` is no 5-field cron expression that fires (None: it is one)."""
    if len(expr.split()) != 5:
        return f"expected 5 fields (minute hour day month weekday), not {expr!r}"
    exc = _cron_error(expr, zone)
    if isinstance(exc, StopIteration):  # pragma: no cover - cronsim's iterator is endless
        return f"{expr!r} never fires"
    if exc is not None:
        minute, hour, day, _month, weekday = expr.split()
        any_month = f"{minute} {hour} {day} * {weekday}"
        if "day-of-month" in str(exc) and _cron_error(any_month, zone) is None:
            # cronsim says "Bad day-of-month" of a day that exists, in no month named.
            return f"{expr!r} never fires: none of the months it names has day {day}"
        return f"{expr!r} is not a valid cron expression: {exc or 'bad field'}"
    return None


def _cron_error(expr: str, zone: Any) -> Exception | None:
    """What cronsim raises finding ``expr``'s first tick (None: it finds one)."""
    try:
        next(CronSim(expr, datetime(2000, 1, 1, tzinfo=zone)))
    except (CronSimError, ValueError, KeyError, IndexError, StopIteration) as exc:
        return exc
    return None


def next_after(timing: Timing, after: datetime) -> datetime:
    """The first tick strictly after ``after`` (a zoned datetime), in UTC.

    Raises:
        TimingUnusable: this host cannot compute the schedule's ticks.
    """
    if timing.every_seconds is not None:
        step = round(timing.every_seconds * 1_000_000)
        elapsed = _micros(after - timing.anchor)
        k = max(0, elapsed // step + 1)
        return timing.anchor + timedelta(microseconds=k * step)
    assert timing.cron is not None
    ticks = timing.cron_ticks(after)
    # cronsim reads a fixed-time expression on the wall clock: in the repeated hour of a
    # fall-back, a time before ``after`` can come out (its first occurrence); skip those.
    for _ in range(_MAX_STEPS):
        tick = next(ticks).astimezone(UTC)
        if tick > after:
            return tick
    raise TimingUnusable(f"cron {timing.cron!r} has no tick after {after.isoformat()}")


def upcoming(timing: Timing, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` ticks after ``after``, in UTC.

    Raises:
        TimingUnusable: this host cannot compute the schedule's ticks.
    """
    out: list[datetime] = []
    for _ in range(count):
        after = next_after(timing, after)
        out.append(after)
    return out


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _last_before(timing: Timing, first: datetime, limit: datetime) -> datetime:
    """The last tick before ``limit``, from ``first`` (a tick before ``limit``) on."""
    if timing.every_seconds is not None:
        step = round(timing.every_seconds * 1_000_000)
        k = math.ceil(_micros(limit - timing.anchor) / step) - 1
        return max(first, timing.anchor + timedelta(microseconds=k * step))
    # Found from the other end (days of missed per-minute ticks, walked one by one, held the
    # event loop for seconds), then walked to forward from a few hours before it: around a
    # change of daylight saving time the two readings of an expression may differ, and the
    # ticks are the forward reading's.
    found = next(timing.cron_ticks(limit, reverse=True)).astimezone(UTC)
    for slack in _SLACKS:  # wider when the forward reading has no tick in the narrower one
        near = found - slack
        last, cursor = (first, first) if near <= first else (None, near)
        for _ in range(_MAX_STEPS):
            tick = next_after(timing, cursor)
            if tick >= limit:
                break
            last = cursor = tick
        if last is not None:
            return last
    return first


def plan(
    timing: Timing, next_fire_at: datetime, catch_up: CatchUp, now: datetime, grace: float
) -> Plan | None:
    """What a schedule whose next tick is ``next_fire_at`` does at ``now`` (None: nothing,
    the tick is not due yet).

    A tick up to ``grace`` seconds late fires (each in turn: a process that was slow for a
    moment catches up); one later than that was missed — the service was down. Missed ticks
    make no task with ``catch_up = "none"``, one task (for the latest of them) with
    ``"latest"``; either way the schedule goes on from its first tick that was not missed.
    That tick, due already (within the grace), fires with the missed ones' record: left to
    the next look, it could be past the grace too by then, and a second stretch was missed.

    Raises:
        TimingUnusable: the tick is due, and this host cannot compute the ones after it.
    """
    if next_fire_at > now:
        return None
    horizon = now - timedelta(seconds=grace)
    if next_fire_at >= horizon:
        return Plan(fire_at=next_fire_at, next_at=next_after(timing, next_fire_at))
    missed = _last_before(timing, next_fire_at, horizon)
    resume = next_after(timing, missed)
    if catch_up == "latest":
        # The latest fires; the ones before it, if any, were missed.
        before = (next_fire_at, missed) if missed > next_fire_at else None
        return Plan(fire_at=missed, next_at=resume, missed=before)
    if resume <= now:
        return Plan(
            fire_at=resume, next_at=next_after(timing, resume), missed=(next_fire_at, resume)
        )
    return Plan(fire_at=None, next_at=resume, missed=(next_fire_at, resume))
