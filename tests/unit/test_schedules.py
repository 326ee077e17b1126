"""Schedules' timing: durations, cron ticks across DST changes, anchored periods, and what a
due schedule does (on time, a little late, after downtime). Every time is given, none read."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestra.errors import InvalidRequest
from orchestra.schedules import (
    ScheduleChanges,
    ScheduleSpec,
    Timing,
    check,
    format_every,
    next_after,
    parse_every,
    plan,
    upcoming,
)

T0 = datetime(2026, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def cron(expr: str, zone: str = "UTC") -> Timing:
    return Timing(cron=expr, timezone=zone, every_seconds=None, anchor=T0)


def every(seconds: float, anchor: datetime = T0) -> Timing:
    return Timing(cron=None, timezone="UTC", every_seconds=seconds, anchor=anchor)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2), ("5m", 300), ("1h30m", 5400), ("1d", 86_400), ("90", 90), ("1.5s", 1.5)],
)
def test_every_reads_durations(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds
    assert parse_every(format_every(seconds)) == seconds


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (2.000001, "2.000001s"),
        (3600.25, "1h0.25s"),
        (59.999999, "59.999999s"),
        (61, "1m1s"),
        (119.9999996, "2m"),  # past the microsecond: the tick it makes, not "1m60s"
    ],
)
def test_every_is_shown_to_the_microsecond_it_ticks_at(seconds: float, shown: str) -> None:
    """2.000001 was shown as "2s" (six significant digits): read back, another period."""
    assert format_every(seconds) == shown
    assert round(parse_every(shown) * 1e6) == round(seconds * 1e6)


@pytest.mark.parametrize("text", ["", "0s", "0.5s", "2x", "1m2h", "400d", "s", "-5m"])
def test_every_refuses_what_is_no_duration_from_1s_to_366d(text: str) -> None:
    with pytest.raises(ValueError):
        parse_every(text)


@pytest.mark.parametrize("text", ["1" + "0" * 308, "x" * 5000])
def test_a_huge_every_is_not_repeated_back_whole(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_every(text)
    assert len(str(refused.value)) < 120 and "…" in str(refused.value)


def test_a_cron_in_berlin_runs_a_time_the_spring_change_skips_when_the_clocks_jump() -> None:
    # 2026-03-29: at 02:00 CET the clocks go to 03:00 CEST; 02:30 does not exist that day.
    ticks = upcoming(cron("30 2 * * *", "Europe/Berlin"), utc(2026, 3, 27, 12, 0), 4)
    assert ticks == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET (UTC+1)
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST: the first moment after the jump
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST (UTC+2)
        utc(2026, 3, 31, 0, 30),
    ]


def test_a_daily_cron_keeps_its_local_time_across_the_change() -> None:
    ticks = upcoming(cron("0 9 * * *", "Europe/Berlin"), utc(2026, 3, 28, 0, 0), 2)
    assert ticks == [utc(2026, 3, 28, 8, 0), utc(2026, 3, 29, 7, 0)]


def test_a_time_the_autumn_change_repeats_runs_once() -> None:
    # 2026-11-01 in New York: at 02:00 EDT the clocks go back to 01:00 EST.
    timing = cron("30 1 * * *", "America/New_York")
    assert upcoming(timing, utc(2026, 10, 31, 12, 0), 3) == [
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT, the first 01:30
        utc(2026, 11, 2, 6, 30),  # 01:30 EST the next day; not the second 01:30 of Nov 1
        utc(2026, 11, 3, 6, 30),
    ]
    # From inside the repeated hour (01:15 EST, after the first 01:30 fired), the wall clock
    # says 01:30 is ahead; it is not: the next tick is the next day's.
    assert next_after(timing, utc(2026, 11, 1, 6, 15)) == utc(2026, 11, 2, 6, 30)


def test_an_hourly_cron_runs_every_real_hour_through_the_autumn_change() -> None:
    ticks = upcoming(cron("0 * * * *", "America/New_York"), utc(2026, 11, 1, 3, 30), 4)
    assert ticks == [utc(2026, 11, 1, h, 0) for h in (4, 5, 6, 7)]  # 00, 01 EDT, 01, 02 EST


def test_every_ticks_are_anchored_and_do_not_drift() -> None:
    timing = every(2)
    assert next_after(timing, T0) == T0 + timedelta(seconds=2)
    assert next_after(timing, T0 + timedelta(seconds=3.9)) == T0 + timedelta(seconds=4)
    assert next_after(timing, T0 + timedelta(seconds=4)) == T0 + timedelta(seconds=6)
    late = T0 + timedelta(days=3, microseconds=7)
    assert next_after(timing, late) == T0 + timedelta(days=3, seconds=2)
    assert next_after(every(1.5), T0 + timedelta(hours=1)) == T0 + timedelta(hours=1, seconds=1.5)


def test_a_tick_not_yet_due_does_nothing() -> None:
    tick = T0 + timedelta(seconds=10)
    assert plan(every(10), tick, "none", tick - timedelta(microseconds=1), 30) is None


def test_a_due_tick_fires_and_the_next_is_one_period_on() -> None:
    tick = T0 + timedelta(seconds=10)
    done = plan(every(10), tick, "none", tick + timedelta(seconds=0.2), 30)
    assert done is not None
    assert (done.fire_at, done.next_at) == (tick, tick + timedelta(seconds=10))


def test_ticks_late_within_the_grace_each_fire_in_turn() -> None:
    tick = T0 + timedelta(seconds=2)
    moment = tick + timedelta(seconds=5)  # three ticks due: +2, +4, +6
    first = plan(every(2), tick, "none", moment, 30)
    assert first is not None and first.fire_at == tick
    second = plan(every(2), first.next_at, "none", moment, 30)
    assert second is not None and second.fire_at == tick + timedelta(seconds=2)


def test_after_downtime_catch_up_none_skips_to_the_first_tick_not_missed() -> None:
    tick = T0 + timedelta(minutes=1)
    moment = T0 + timedelta(hours=5, seconds=20)
    done = plan(every(60), tick, "none", moment, 30)
    assert done is not None
    assert done.missed == (tick, T0 + timedelta(hours=5))
    # 20 s late: within the grace, so it fires, in the same record: left to the next look
    # (after the other schedules' ticks), it was past the grace too, and a second stretch
    # was recorded missed (helper-119: every 1 s schedule of ten, after a 45 s stop).
    assert done.fire_at == T0 + timedelta(hours=5)
    assert done.next_at == T0 + timedelta(hours=5, minutes=1)
    later = plan(every(60), tick, "none", T0 + timedelta(hours=5, seconds=50), 30)
    assert later is not None and later.fire_at is None  # not due yet: nothing fires
    assert later.next_at == T0 + timedelta(hours=5, minutes=1)


def test_after_downtime_catch_up_latest_fires_once_for_the_latest_missed_tick() -> None:
    timing = cron("0 * * * *")
    tick = utc(2026, 1, 1, 1, 0)
    moment = utc(2026, 1, 3, 7, 40)
    done = plan(timing, tick, "latest", moment, 30)
    assert done is not None
    assert (done.fire_at, done.next_at) == (utc(2026, 1, 3, 7, 0), utc(2026, 1, 3, 8, 0))
    nothing_left = plan(timing, done.next_at, "latest", moment, 30)
    assert nothing_left is None


def _walked(timing: Timing, first: datetime, limit: datetime) -> datetime:
    """The last tick before ``limit``, walked to forward one tick at a time from ``first``."""
    last = first
    while (tick := next_after(timing, last)) < limit:
        last = tick
    return last


@pytest.mark.parametrize("expr", ["* * * * *", "30 2 * * *", "*/30 2 * * *", "10,40 1 * * *"])
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize(
    "limit",
    [
        utc(2027, 3, 28, 1, 30, 5),  # Berlin's spring night
        utc(2027, 10, 31, 1, 10),  # Berlin's autumn night
        utc(2027, 3, 14, 7, 45),  # New York's spring night
        utc(2027, 11, 7, 6, 20, 30),  # New York's autumn night
        utc(2027, 4, 3, 15, 50),  # Lord Howe's half-hour change
    ],
)
def test_the_last_missed_tick_is_the_one_the_ticks_walked_forward_reach(
    expr: str, zone: str, limit: datetime
) -> None:
    """Found from the other end, across daylight saving changes too: the same tick as the
    forward reading's, which the schedule fires by."""
    timing = cron(expr, zone)
    first = next_after(timing, limit - timedelta(days=3))
    done = plan(timing, first, "latest", limit + timedelta(seconds=30), 30)
    assert done is not None and done.fire_at == _walked(timing, first, limit)


def test_days_of_missed_minute_ticks_are_planned_at_once() -> None:
    """60 days of per-minute ticks missed (the service was down): each was walked one by
    one, 1.4 s of the event loop for each such schedule, before the ticks were planned."""
    timing = cron("* * * * *", "Europe/Berlin")
    began = time.process_time()
    done = plan(timing, utc(2026, 12, 4, 22, 37), "none", utc(2027, 2, 2, 22, 36, 40), 30)
    assert time.process_time() - began < 0.5
    assert done is not None and done.missed is not None
    assert done.missed == (utc(2026, 12, 4, 22, 37), utc(2027, 2, 2, 22, 37))


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "0 * * * * *"}, "cron"),  # seconds: not a 5-field expression
        ({"cron": "0 0 31 2 *"}, "cron"),  # never fires
        ({"cron": "not cron at all"}, "cron"),
        ({"every": "2x"}, "every"),
        ({"cron": "0 * * * *", "every": "5m"}, "cron"),
        ({}, "cron"),
        ({"every": "5m", "timezone": "Mars/Olympus"}, "timezone"),
    ],
)
def test_bad_timing_is_refused_naming_the_field(fields: dict[str, str], bad: str) -> None:
    spec = ScheduleSpec(name="s", template="summarize", **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as caught:
        check(spec)
    assert bad in {p.field for p in caught.value.fields}


@pytest.mark.parametrize(
    ("expr", "said"),
    [
        ("0 0 30 2 *", "'0 0 30 2 *' never fires: none of the months it names has day 30"),
        ("0 0 31 4,6 *", "never fires: none of the months it names has day 31"),
        ("0 0 32 * *", "'0 0 32 * *' is not a valid cron expression: Bad day-of-month"),
    ],
)
def test_a_day_no_month_named_has_is_told_as_such(expr: str, said: str) -> None:
    """cronsim calls day 30 of February a "Bad day-of-month", as it does day 32."""
    with pytest.raises(InvalidRequest) as caught:
        check(ScheduleSpec(name="s", template="t", cron=expr))
    assert said in caught.value.fields[0].message


def test_a_cron_schedule_checks_out_and_an_every_one_gives_its_seconds() -> None:
    assert check(ScheduleSpec(name="s", template="t", cron="*/5 * * * 1-5")) is None
    assert check(ScheduleSpec(name="s", template="t", every="1h30m")) == 5400


def test_changes_apply_only_the_fields_given() -> None:
    spec = ScheduleSpec(name="s", template="t", every="5m", priority=3)
    changed = ScheduleChanges(enabled=False, model=None).apply(spec)
    assert (changed.enabled, changed.priority, changed.every, changed.model) == (
        False,
        3,
        "5m",
        None,
    )
