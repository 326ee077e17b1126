"""Schedules through the API and the CLI, on a real service and database.

The tests about ticks run a service without workers (so its loop fires nothing and its tasks
stay queued), replace its schedules' clock, and fire what is due themselves with the loop's
own step: time is what the test says it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from orchestra.client import AsyncClient
from orchestra.config import Settings
from orchestra.domain import iso
from orchestra.scheduler import ScheduleLoop
from orchestra.schedules import ScheduleSpec
from tests.conftest import Service, StartService, sql_rows
from tests.fixtures.logs import captured, events
from tests.fixtures.servers import wait_until
from tests.integration.test_cli import run_cli

SCHEDULES = "/api/v1/schedules"
START = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def body(name: str = "digest", **fields: Any) -> dict[str, Any]:
    return {"name": name, "template": "summarize", "params": {"text": "the news"}, **fields}


def no_workers(settings: Settings, **changes: Any) -> Settings:
    server = msgspec.structs.replace(settings.server, workers=False)
    return msgspec.structs.replace(settings, server=server, **changes)


@pytest.fixture
async def idle(settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    """A service whose schedules fire only when the test says, on the test's clock."""
    async with start_service(no_workers(settings)) as svc:
        svc.app.runtime.schedules.clock = Clock(START)
        yield svc


def clock_of(svc: Service) -> Clock:
    clock: Clock = svc.app.runtime.schedules.clock
    return clock


async def fire_due(svc: Service, grace: float = 30.0) -> None:
    """Fire every tick due on the service's clock, as its loop would."""
    loop = ScheduleLoop(svc.app.runtime.schedules, grace=grace)
    for _ in range(100):
        if await loop.step() > 0:
            return
    raise AssertionError("the loop kept finding ticks due")


async def create(svc: Service, **fields: Any) -> dict[str, Any]:
    response = await svc.client.post(SCHEDULES, json=body(**fields))
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


async def fires(svc: Service, ref: Any) -> list[dict[str, Any]]:
    response = await svc.client.get(f"{SCHEDULES}/{ref}")
    assert response.status_code == 200, response.text
    last: list[dict[str, Any]] = response.json()["last_tasks"]
    return last


async def test_a_schedule_is_created_read_changed_paused_and_deleted(idle: Service) -> None:
    made = await create(idle, every="1h", priority=2, options={"max_attempts": 1})
    assert made["next_fire_at"] == iso(START + timedelta(hours=1))
    one = (await idle.client.get(f"{SCHEDULES}/{made['id']}")).json()
    assert one["next_fire_times"] == [iso(START + timedelta(hours=h)) for h in range(1, 6)]
    assert one["last_tasks"] == []
    assert (await idle.client.get(f"{SCHEDULES}/digest")).json()["id"] == made["id"]
    listed = (await idle.client.get(SCHEDULES)).json()["items"]
    assert [(s["name"], s["every"], s["source"]) for s in listed] == [("digest", "1h", "api")]

    clock_of(idle).advance(600)
    same_timing = await idle.client.patch(f"{SCHEDULES}/digest", json={"priority": 5})
    assert same_timing.status_code == 200, same_timing.text
    assert same_timing.json()["priority"] == 5
    assert same_timing.json()["next_fire_at"] == made["next_fire_at"]  # its ticks stay

    to_cron = await idle.client.patch(
        f"{SCHEDULES}/digest", json={"cron": "0 9 * * *", "timezone": "Europe/Berlin"}
    )
    assert to_cron.status_code == 200, to_cron.text
    assert (to_cron.json()["cron"], to_cron.json()["every"]) == ("0 9 * * *", None)
    assert to_cron.json()["next_fire_at"] == iso(datetime(2026, 6, 2, 7, 0, tzinfo=UTC))

    paused = await idle.client.patch(f"{SCHEDULES}/digest", json={"enabled": False})
    assert (paused.json()["enabled"], paused.json()["next_fire_at"]) == (False, None)
    resumed = await idle.client.patch(f"{SCHEDULES}/digest", json={"enabled": True})
    assert resumed.json()["next_fire_at"] == to_cron.json()["next_fire_at"]

    assert (await idle.client.delete(f"{SCHEDULES}/{made['id']}")).status_code == 204
    assert (await idle.client.get(f"{SCHEDULES}/digest")).status_code == 404
    assert (await idle.client.get(SCHEDULES)).json()["items"] == []


async def test_the_list_comes_in_pages_by_name_and_the_client_follows_them(
    idle: Service,
) -> None:
    """Thousands of schedules (one per customer) were one answer; now pages of ``limit``
    (100 unless asked, at most 500), by name, ``next_cursor`` naming the last one."""
    names = [f"s{n:03d}" for n in range(25)]
    for name in reversed(names):
        assert (await idle.client.post(SCHEDULES, json=body(name, every="1h"))).status_code == 201
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        page = (await idle.client.get(SCHEDULES, params=params)).json()
        assert len(page["items"]) <= 10
        seen += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert cursor == seen[-1]
    assert seen == names
    whole = (await idle.client.get(SCHEDULES)).json()
    assert [i["name"] for i in whole["items"]] == names and whole["next_cursor"] is None
    for bad in ({"limit": 0}, {"limit": 501}, {"cursor": "not a name!"}):
        refused = await idle.client.get(SCHEDULES, params=bad)
        assert refused.status_code == 400, refused.text
    async with AsyncClient(idle.url) as client:  # the client's list: every page's items
        assert [s.name for s in await client.list_schedules(page_size=7)] == names


async def test_every_takes_a_number_of_seconds_as_the_docs_say(idle: Service) -> None:
    made = await create(idle, every=3600)
    assert made["every"] == "1h"  # as it shows every duration
    assert made["next_fire_at"] == iso(START + timedelta(hours=1))
    changed = await idle.client.patch(f"{SCHEDULES}/digest", json={"every": 90})
    assert changed.status_code == 200, changed.text
    assert changed.json()["every"] == "1m30s"
    # Every number as given: 30 days (a 2.592e+06 was refused), and no rounding to 1 s.
    for seconds, shown in ((2592000, "30d"), (1000000, "11d13h46m40s")):
        changed = await idle.client.patch(f"{SCHEDULES}/digest", json={"every": seconds})
        assert changed.status_code == 200, changed.text
        assert changed.json()["every"] == shown
    for bad in (0, 0.5, -5, 0.9999999):
        refused = await idle.client.patch(f"{SCHEDULES}/digest", json={"every": bad})
        assert refused.status_code == 400, refused.text
        assert "every" in {f["field"] for f in refused.json()["fields"]}


@pytest.mark.parametrize(
    ("fields", "status", "field"),
    [
        ({"cron": "61 * * * *"}, 400, "cron"),
        ({"cron": "* * *"}, 400, "cron"),
        ({"cron": "0 * * * *", "every": "1m"}, 400, "cron"),
        ({}, 400, "cron"),
        ({"every": "2 fortnights"}, 400, "every"),
        ({"every": "0s"}, 400, "every"),
        ({"every": "1m", "timezone": "Atlantis/Capital"}, 400, "timezone"),
        ({"every": "1m", "params": {}}, 422, "params.text"),
        ({"every": "1m", "params": {"text": "x", "sentences": "many"}}, 422, "params.sentences"),
        ({"every": "1m", "template": "no-such-template"}, 404, None),
        ({"every": "1m", "name": "12345"}, 400, "name"),
        ({"every": "1m", "overlap": "sometimes"}, 400, "overlap"),
        ({"every": "1m", "priority": 10_000}, 400, "priority"),
        ({"every": "1m", "colour": "red"}, 400, None),
        ({"every": "1m", "options": {"timeout": -1}}, 400, None),
        # Of the wrong JSON type: refused, not converted (a string took as a number before).
        ({"every": "1m", "priority": "3"}, 400, "priority"),
        ({"every": "1m", "enabled": "false"}, 400, "enabled"),
    ],
)
async def test_bad_schedules_get_a_4xx_naming_the_field(
    idle: Service, fields: dict[str, Any], status: int, field: str | None
) -> None:
    response = await idle.client.post(SCHEDULES, json=body(**fields))
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["message"]
    if field is not None:
        assert field in {f["field"] for f in answer["fields"]}, answer
    assert (await idle.client.get(SCHEDULES)).json()["items"] == []


async def test_huge_params_malformed_bodies_and_paths_get_a_4xx(idle: Service) -> None:
    huge = await idle.client.post(
        SCHEDULES, json=body(every="1m", params={"text": "x" * 3_000_000})
    )
    assert huge.status_code == 413, huge.text
    long_string = await idle.client.post(
        SCHEDULES, json=body(every="1m", params={"text": "x" * 300_000})
    )
    assert long_string.status_code == 422, long_string.text
    assert long_string.json()["fields"][0]["field"] == "params.text"
    not_json = await idle.client.post(
        SCHEDULES, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    for path in ("%ff%fe", "99999999999999999999999", "0", "no-such"):
        assert (await idle.client.get(f"{SCHEDULES}/{path}")).status_code == 404, path
        assert (await idle.client.delete(f"{SCHEDULES}/{path}")).status_code == 404, path
    await create(idle, every="1m")
    again = await idle.client.post(SCHEDULES, json=body(every="5m"))
    assert again.status_code == 409
    assert again.json()["fields"] == [{"field": "name", "message": "is taken by another schedule"}]
    bad_patch = await idle.client.patch(f"{SCHEDULES}/digest", json={"cron": "99 99 * * *"})
    assert bad_patch.status_code == 400
    assert bad_patch.json()["fields"][0]["field"] == "cron"
    bad_params = await idle.client.patch(f"{SCHEDULES}/digest", json={"params": {"text": 7}})
    assert bad_params.status_code == 422
    await create(idle, name="other", every="1m")
    taken = await idle.client.patch(f"{SCHEDULES}/other", json={"name": "digest"})
    assert taken.status_code == 409 and taken.json()["fields"][0]["field"] == "name"
    assert (await idle.client.get(f"{SCHEDULES}/digest")).json()["every"] == "1m"


async def test_each_tick_makes_one_task_and_a_tick_fired_already_makes_none(
    idle: Service, db_url: str
) -> None:
    made = await create(idle, every="1m", overlap="allow")
    clock = clock_of(idle)
    clock.advance(59)
    await fire_due(idle)
    assert await fires(idle, "digest") == []
    clock.advance(1)
    await fire_due(idle)
    await fire_due(idle)  # nothing more is due
    first = await fires(idle, "digest")
    assert [(f["fire_at"], f["outcome"], f["task_status"]) for f in first] == [
        (made["next_fire_at"], "submitted", "queued")
    ]
    task = (await idle.client.get(f"/api/v1/tasks/{first[0]['task_id']}")).json()
    assert (task["template"], task["params"]["text"]) == ("summarize", "the news")

    # Put the schedule back on the tick it fired: the (schedule, tick) row refuses it again.
    sql_rows(
        db_url, "UPDATE schedules SET next_fire_at = ? WHERE id = ?", (made["next_fire_at"], 1)
    )
    await fire_due(idle)
    assert len(await fires(idle, "digest")) == 1
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(1,)]

    clock.advance(60 * 3)  # three more ticks, each within a grace of 5 minutes
    await fire_due(idle, grace=300)
    after = await fires(idle, "digest")
    assert [f["outcome"] for f in after] == ["submitted"] * 4
    ticks = [f["fire_at"] for f in reversed(after)]
    assert ticks == [iso(START + timedelta(minutes=m)) for m in range(1, 5)]
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(4,)]


async def test_overlap_skip_skips_ticks_while_the_previous_task_is_unfinished(
    idle: Service, db_url: str
) -> None:
    await create(idle, every="1m")  # overlap "skip" is the default
    clock = clock_of(idle)
    clock.advance(60)
    await fire_due(idle)
    clock.advance(60)
    with captured() as logged:
        await fire_due(idle)  # the first task is still queued (no workers)
    recorded = await fires(idle, "digest")
    outcomes = [(f["outcome"], f["task_id"]) for f in recorded]
    first_task = outcomes[1][1]
    assert outcomes == [("skipped", None), ("submitted", first_task)]
    # A skipped tick says why (it said nothing), in its record and in the log.
    why = f"task {first_task}, of an earlier tick, is still queued"
    assert recorded[0]["error"] == why
    [line] = events(logged, "schedule.fired")
    assert (line["outcome"], line["reason"]) == ("skipped", why), line
    cancelled = await idle.client.post(f"/api/v1/tasks/{first_task}/cancel")
    assert cancelled.status_code == 200
    clock.advance(60)
    await fire_due(idle)
    latest = (await fires(idle, "digest"))[0]
    assert latest["outcome"] == "submitted" and latest["task_id"] != first_task
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(2,)]


async def test_overlap_allow_queues_a_task_per_tick_regardless(idle: Service) -> None:
    await create(idle, every="1m", overlap="allow")
    for _ in range(2):
        clock_of(idle).advance(60)
        await fire_due(idle)
    assert [f["outcome"] for f in await fires(idle, "digest")] == ["submitted", "submitted"]


async def test_after_downtime_catch_up_none_fires_nothing_for_the_missed_ticks(
    idle: Service,
) -> None:
    await create(idle, every="1m", catch_up="none")
    clock_of(idle).advance(3600 + 45)  # an hour down: the tick at +60m is 45 s late
    await fire_due(idle)
    # No task; one record says which ticks were missed (nothing did, before).
    [missed] = await fires(idle, "digest")
    assert (missed["fire_at"], missed["outcome"], missed["task_id"]) == (
        iso(START + timedelta(minutes=1)),
        "missed",
        None,
    )
    assert missed["error"] == (
        f"every tick from {iso(START + timedelta(minutes=1))} to before "
        f"{iso(START + timedelta(minutes=61))} was missed (the service was not running, or "
        "could not use its database)"
    )
    one = (await idle.client.get(f"{SCHEDULES}/digest")).json()
    assert one["next_fire_at"] == iso(START + timedelta(minutes=61))


async def test_after_downtime_catch_up_latest_fires_once_for_the_missed_ticks(
    idle: Service, db_url: str
) -> None:
    await create(idle, cron="*/10 * * * *", catch_up="latest")
    clock_of(idle).advance(5 * 3600 + 7 * 60)  # down for five hours
    with captured() as logged:
        await fire_due(idle)
    got = await fires(idle, "digest")
    assert [(f["fire_at"], f["outcome"]) for f in got] == [
        (iso(START + timedelta(hours=5)), "submitted"),
        (iso(START + timedelta(minutes=10)), "missed"),  # the ticks before it
    ]
    assert got[1]["error"].endswith(
        f"to before {iso(START + timedelta(hours=5))} was missed (the service was not "
        "running, or could not use its database)"
    )
    # The log line of the tick that fired says the ticks missed before it too (it did not).
    [line] = events(logged, "schedule.fired")
    assert (line["outcome"], line["missed"]) == ("submitted", got[1]["error"]), line
    one = (await idle.client.get(f"{SCHEDULES}/digest")).json()
    assert one["next_fire_at"] == iso(START + timedelta(hours=5, minutes=10))
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(1,)]


async def schedule_of_a_gone_template(svc: Service) -> dict[str, Any]:
    """The schedule ``digest`` (every minute) of a template ``temporary`` deleted since."""
    template = (
        "name: temporary\nversion: 1\nmodel: default\n"
        "parameters: {text: {type: string, required: true}}\n"
        "steps:\n  - id: s\n    prompt: '{{ params.text }}'\n"
    )
    registered = await svc.client.post("/api/v1/templates", content=template.encode())
    assert registered.status_code == 201, registered.text
    made = await create(svc, every="1m", template="temporary")
    assert (await svc.client.delete("/api/v1/templates/temporary")).status_code == 204
    return made


async def test_a_tick_whose_template_is_gone_is_recorded_as_failed(idle: Service) -> None:
    await schedule_of_a_gone_template(idle)
    clock_of(idle).advance(60)
    await fire_due(idle)
    [fire] = await fires(idle, "digest")
    assert (fire["outcome"], fire["task_id"]) == ("failed", None)
    assert "temporary" in fire["error"]
    # Pausing is what such a schedule needs: it answered 404 template_not_found.
    paused = await idle.client.patch(f"{SCHEDULES}/digest", json={"enabled": False})
    assert paused.status_code == 200, paused.text
    assert paused.json()["enabled"] is False and paused.json()["next_fire_at"] is None
    # Resuming checks it again, as a new schedule is checked.
    resumed = await idle.client.patch(f"{SCHEDULES}/digest", json={"enabled": True})
    assert resumed.status_code == 404 and resumed.json()["code"] == "template_not_found"


async def test_a_tick_whose_parameters_no_longer_fit_names_the_parameter(idle: Service) -> None:
    template = (
        "name: changing\nversion: {v}\nmodel: default\n"
        "parameters: {{text: {{type: {t}, required: true}}}}\n"
        "steps:\n  - id: s\n    prompt: '{{{{ params.text }}}}'\n"
    )
    for version, kind in ((1, "string"), (2, "integer")):
        registered = await idle.client.post(
            "/api/v1/templates", content=template.format(v=version, t=kind).encode()
        )
        assert registered.status_code == 201, registered.text
        if version == 1:
            await create(idle, every="1m", template="changing")
    clock_of(idle).advance(60)
    await fire_due(idle)
    [fire] = await fires(idle, "digest")
    assert fire["outcome"] == "failed"
    assert "; params.text: 'the news' is not of type 'integer'" in fire["error"], fire["error"]


async def test_config_schedules_are_synced_at_start_and_kept_read_only(
    settings: Settings, start_service: StartService
) -> None:
    declared = ScheduleSpec(
        name="nightly", template="summarize", params={"text": "t"}, cron="0 3 * * *"
    )
    with_one = no_workers(settings, schedules=[declared])
    async with start_service(with_one) as svc:
        one = (await svc.client.get(f"{SCHEDULES}/nightly")).json()
        assert (one["source"], one["cron"]) == ("config", "0 3 * * *")
        changed = await svc.client.patch(f"{SCHEDULES}/nightly", json={"priority": 3})
        assert changed.status_code == 409
        assert "declared in the settings' [[schedules]]" in changed.json()["message"]
        assert (await svc.client.delete(f"{SCHEDULES}/nightly")).status_code == 409
        paused = await svc.client.patch(f"{SCHEDULES}/nightly", json={"enabled": False})
        assert paused.status_code == 200 and paused.json()["next_fire_at"] is None
        await create(svc, name="mine", every="1h")
    # A start keeps the pause: every start ended it, a supervisor's restart of one crashed
    # process too, or a replica rescheduled (helper-119, helper-123).
    async with start_service(with_one) as svc:
        kept = (await svc.client.get(f"{SCHEDULES}/nightly")).json()
        assert (kept["enabled"], kept["next_fire_at"]) == (False, None), kept
    # The file's enabled applies when the file changes it.
    off = no_workers(settings, schedules=[msgspec.structs.replace(declared, enabled=False)])
    async with start_service(off) as svc:
        assert (await svc.client.get(f"{SCHEDULES}/nightly")).json()["enabled"] is False
        resumed = await svc.client.patch(f"{SCHEDULES}/nightly", json={"enabled": True})
        assert resumed.json()["enabled"] is True
    async with start_service(off) as svc:  # resumed through the API: that stands too
        assert (await svc.client.get(f"{SCHEDULES}/nightly")).json()["enabled"] is True
    async with start_service(off) as svc:
        await svc.client.patch(f"{SCHEDULES}/nightly", json={"enabled": False})
    async with start_service(with_one) as svc:  # the file says enabled again: it applies
        again = (await svc.client.get(f"{SCHEDULES}/nightly")).json()
        assert again["enabled"] and again["next_fire_at"] == one["next_fire_at"]
        assert again["id"] == one["id"]
    async with start_service(no_workers(settings)) as svc:  # removed from the file
        names = [s["name"] for s in (await svc.client.get(SCHEDULES)).json()["items"]]
        assert names == ["mine"]


async def test_the_cli_creates_lists_pauses_resumes_and_deletes(service: Service) -> None:
    code, out, err = await run_cli(
        "schedules",
        "create",
        "hourly",
        "summarize",
        "--every",
        "1h",
        "-p",
        "text=hello",
        "-p",
        "sentences=2",
        "--url",
        service.url,
    )
    assert code == 0, err
    assert "hourly" in out and "every 1h" in out
    made = (await service.client.get(f"{SCHEDULES}/hourly")).json()
    assert made["params"] == {"text": "hello", "sentences": 2}
    code, out, err = await run_cli("schedules", "pause", "hourly", "--url", service.url)
    assert code == 0 and "paused" in out, err
    code, out, err = await run_cli("schedules", "list", "--url", service.url)
    assert code == 0 and "hourly" in out and "paused" in out, err
    code, out, err = await run_cli("schedules", "resume", str(made["id"]), "--url", service.url)
    assert code == 0 and "next 20" in out, err
    code, out, err = await run_cli(
        "schedules",
        "create",
        "bad",
        "summarize",
        "--cron",
        "61 * * * *",
        "-p",
        "text=x",
        "--url",
        service.url,
    )
    assert code == 1 and "cron" in err
    code, out, err = await run_cli("schedules", "delete", "hourly", "--url", service.url)
    assert code == 0, err
    assert (await service.client.get(SCHEDULES)).json()["items"] == []


async def test_a_running_service_fires_an_every_second_schedule_into_finished_tasks(
    service: Service, db_url: str
) -> None:
    await create(service, every="1s", overlap="allow")

    async def three_done() -> bool:
        done = [f for f in await fires(service, "digest") if f["task_status"] == "succeeded"]
        return len(done) >= 3

    await wait_until(three_done, timeout=30, interval=0.2)
    rows = sql_rows(db_url, "SELECT fire_at, task_id FROM schedule_fires ORDER BY fire_at")
    assert len({r[1] for r in rows}) == len(rows)  # one task per tick


async def test_each_recorded_tick_is_counted_by_schedule_and_outcome(idle: Service) -> None:
    """``orchestra_schedule_ticks_total``: what an operator alerts on (ticks failing, missed)."""
    from tests.integration.test_metrics import scrape

    def ticks(scraped: Any, outcome: str) -> float:
        return float(scraped("orchestra_schedule_ticks_total", schedule="ticked", outcome=outcome))

    before = await scrape(idle.client)
    await create(idle, name="ticked", every="1m")
    clock_of(idle).advance(60)
    await fire_due(idle)  # submitted (no workers: the task stays queued)
    clock_of(idle).advance(60)
    await fire_due(idle)  # skipped: the previous task is unfinished
    clock_of(idle).advance(3600 + 45)
    await fire_due(idle)  # an hour down: one stretch missed (catch_up none)
    after = await scrape(idle.client)
    counted = {o: ticks(after, o) - ticks(before, o) for o in ("submitted", "skipped", "missed")}
    assert counted == {"submitted": 1, "skipped": 1, "missed": 1}
    assert ticks(after, "failed") - ticks(before, "failed") == 0


async def test_run_now_submits_the_task_a_tick_would_and_leaves_the_ticks_be(
    idle: Service, db_url: str
) -> None:
    made = await create(idle, every="1h", priority=3)
    clock_of(idle).advance(3600)
    await fire_due(idle)  # one tick, for the record
    before = (await idle.client.get(f"{SCHEDULES}/digest")).json()
    ran = await idle.client.post(f"{SCHEDULES}/digest/run")
    assert ran.status_code == 201, ran.text
    task = ran.json()
    assert ran.headers["location"] == f"/api/v1/tasks/{task['id']}"
    assert (task["template"], task["params"]["text"], task["status"]) == (
        "summarize",
        "the news",
        "queued",
    )
    after = (await idle.client.get(f"{SCHEDULES}/digest")).json()
    assert after["last_tasks"] == before["last_tasks"]  # not a tick
    assert after["next_fire_at"] == before["next_fire_at"]
    # Paused too; by id; the CLI prints the new task's id.
    assert (await idle.client.patch(f"{SCHEDULES}/digest", json={"enabled": False})).is_success
    assert (await idle.client.post(f"{SCHEDULES}/{made['id']}/run")).status_code == 201
    code, out, err = await run_cli("schedules", "run", "digest", "--url", idle.url)
    assert code == 0 and out.strip().isdigit(), err
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(4,)]
    missing = await idle.client.post(f"{SCHEDULES}/nope/run")
    assert missing.status_code == 404 and missing.json()["code"] == "schedule_not_found"


async def test_a_renamed_schedules_tick_counters_start_at_zero_under_its_new_name(
    idle: Service,
) -> None:
    """An alert on ``increase(orchestra_schedule_ticks_total{outcome="failed"}[1h]) > 0``
    sees a schedule's first failure only if its counter was there at 0 before it: made at
    creation and at start, not at a rename (helper-109)."""
    from tests.integration.test_metrics import scrape

    await create(idle, name="before-rename", every="1m")
    renamed = await idle.client.patch(f"{SCHEDULES}/before-rename", json={"name": "renamed"})
    assert renamed.status_code == 200, renamed.text
    scraped = await scrape(idle.client)
    series = {
        dict(labels)["outcome"]
        for (name, labels), value in scraped.samples.items()
        if name == "orchestra_schedule_ticks_total"
        and ("schedule", "renamed") in labels
        and value == 0
    }
    assert series == {"submitted", "skipped", "failed", "missed"}
