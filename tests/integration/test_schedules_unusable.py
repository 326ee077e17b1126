"""A schedule whose ticks this host cannot compute: a time zone its tzdata lacks (hosts with
different tzdata share the database; an OS upgrade dropped ``US/Eastern``), or a cron
expression the installed cronsim no longer reads. Its tick fails, on its own; every other
schedule fires as before, and its pages answer.

The database is changed under the service (as another host, or an upgrade, would) with SQL.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from orchestra.domain import iso
from tests.conftest import Service, sql_rows
from tests.fixtures.logs import captured, events
from tests.fixtures.servers import wait_until
from tests.integration.test_schedules import (
    SCHEDULES,
    START,
    body,
    clock_of,
    create,
    fire_due,
    fires,
)
from tests.integration.test_schedules import idle as idle  # (a fixture)

#: How soon a tick that could not be computed is tried again (docs/schedules.md).
RETRY = timedelta(minutes=1)
ZONE_GONE = "time zone 'America/Nowhere' is not known on this host"


def break_timing(db_url: str, name: str, **columns: str) -> None:
    """Change a schedule's columns in the database, behind the service's back."""
    sets = ", ".join(f"{c} = ?" for c in columns)
    sql_rows(db_url, f"UPDATE schedules SET {sets} WHERE name = ?", (*columns.values(), name))


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"timezone": "America/Nowhere"}, ZONE_GONE),
        ({"cron": "61 * * * *"}, "cron '61 * * * *' cannot be read on this host"),
    ],
    ids=["time-zone", "cron"],
)
async def test_a_tick_this_host_cannot_compute_fails_alone_and_is_retried_a_minute_later(
    idle: Service, db_url: str, columns: dict[str, str], reason: str
) -> None:
    # Its tick is the earliest due: the due schedules are fired earliest first.
    bad = await create(idle, name="bad", cron="* * * * *")
    await create(idle, name="good", every="90s", overlap="allow")
    break_timing(db_url, "bad", **columns)
    clock = clock_of(idle)
    clock.advance(90)
    with captured() as logged:
        await fire_due(idle)  # it raised, and no schedule fired again, every second
    [failed] = await fires(idle, "bad")
    assert (failed["fire_at"], failed["outcome"], failed["task_id"]) == (
        bad["next_fire_at"],
        "failed",
        None,
    )
    assert reason in failed["error"], failed["error"]
    assert [f["outcome"] for f in await fires(idle, "good")] == ["submitted"]
    # A warning, not an info line among the ticks that fire as usual.
    [warned] = [e for e in events(logged, "schedule.fired") if e["schedule"] == "bad"]
    assert warned["log_level"] == "warning" and reason in warned["reason"]

    # Tried again a minute later, not at every look of the loop.
    shown = await idle.client.get(f"{SCHEDULES}/bad")
    assert shown.status_code == 200, shown.text
    retry = iso(START + timedelta(seconds=90) + RETRY)
    assert shown.json()["next_fire_at"] == retry
    assert shown.json()["next_fire_times"] == []
    assert reason in shown.json()["timing_error"]
    clock.advance(RETRY.total_seconds() - 1)
    await fire_due(idle)
    assert len(await fires(idle, "bad")) == 1
    clock.advance(1)
    await fire_due(idle)
    assert [f["outcome"] for f in await fires(idle, "bad")] == ["failed", "failed"]
    clock.advance(30)
    await fire_due(idle)
    assert [f["outcome"] for f in await fires(idle, "good")] == ["submitted"] * 2

    # Its page says why; the list answers as before.
    page = await idle.client.get(f"/ui/schedules/{bad['id']}")
    assert page.status_code == 200, page.text
    assert 'id="timing-error"' in page.text and reason in page.text.replace("&#39;", "'")
    assert (await idle.client.get("/ui/schedules")).status_code == 200

    # Fixed (here: its timing changed through the API), it goes on from its ticks.
    fixed = await idle.client.patch(
        f"{SCHEDULES}/bad", json={"cron": "*/5 * * * *", "timezone": "Europe/Berlin"}
    )
    assert fixed.status_code == 200, fixed.text
    again = (await idle.client.get(f"{SCHEDULES}/bad")).json()
    assert "timing_error" not in again and len(again["next_fire_times"]) == 5


async def test_a_retried_tick_fires_on_a_host_that_can_compute_it(
    idle: Service, db_url: str
) -> None:
    """Hosts with different tzdata share the database: the retry one host stored fires on
    another that knows the zone, and the schedule is back on its own ticks."""
    await create(idle, name="bad", cron="0 * * * *", timezone="Europe/Berlin")
    break_timing(db_url, "bad", timezone="America/Nowhere")
    clock = clock_of(idle)
    clock.advance(3600)
    await fire_due(idle)
    retry = START + timedelta(hours=1) + RETRY
    break_timing(db_url, "bad", timezone="Europe/Berlin")  # the other host's reading
    clock.advance(RETRY.total_seconds())
    await fire_due(idle)
    outcomes = [(f["fire_at"], f["outcome"]) for f in await fires(idle, "bad")]
    assert outcomes == [(iso(retry), "submitted"), (iso(START + timedelta(hours=1)), "failed")]
    shown = (await idle.client.get(f"{SCHEDULES}/bad")).json()
    assert shown["next_fire_at"] == iso(START + timedelta(hours=2))


async def test_a_running_service_keeps_firing_its_schedules_beside_one_it_cannot_compute(
    service: Service, db_url: str
) -> None:
    """The real loop, on the real clock: one schedule's unknown zone stopped every schedule
    of the process (``scheduler.step_failed`` every second)."""
    made = await service.client.post(SCHEDULES, json=body("bad", cron="0 0 1 1 *"))
    assert made.status_code == 201, made.text
    past = "2020-01-01T00:00:00.000000Z"  # long due: earlier than any other tick
    break_timing(db_url, "bad", timezone="America/Nowhere", next_fire_at=past)
    with captured(logging.WARNING) as logged:
        await create(service, name="pulse", every="1s", overlap="allow")

        async def pulse_fired_thrice() -> bool:
            return len(await fires(service, "pulse")) >= 3

        await wait_until(pulse_fired_thrice, timeout=20, interval=0.2)
    [failed] = await fires(service, "bad")
    assert (failed["fire_at"], failed["outcome"]) == (past, "failed")
    assert ZONE_GONE in failed["error"]
    assert events(logged, "scheduler.step_failed") == []
    page = await service.client.get(f"/ui/schedules/{made.json()['id']}")
    assert page.status_code == 200, page.text
