"""Schedules at work: what the API does with them (:class:`ScheduleService`), and the loop
that fires their ticks (:class:`ScheduleLoop`), which every process with workers runs.

Each due tick is fired in one transaction (:meth:`~orchestra.db.schedules.ScheduleStore.fire`)
whose unique ``schedule_fires`` row makes it fire once, however many processes see it due:
the loser of a race finds the schedule moved on, which is a normal outcome. The loop sleeps
until the earliest next tick of any schedule (at most ``[scheduler] interval``, so it sees
schedules other processes changed), and wakes at once when this process changes one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import msgspec

from orchestra import logs, metrics
from orchestra.db.schedules import Fire, Fired, ScheduleStore
from orchestra.domain import NewTask, Task, iso, now, storable_id
from orchestra.errors import (
    ConfigError,
    ConflictError,
    InvalidRequest,
    NotFoundError,
)
from orchestra.schedules import (
    Plan,
    Schedule,
    ScheduleChanges,
    ScheduleNotFound,
    ScheduleSpec,
    Timing,
    TimingUnusable,
    check,
    next_after,
    parse_time,
    plan,
    upcoming,
)
from orchestra.tasks import SubmitTask, TaskService

log = logs.get("orchestra.scheduler")

#: The fields a PATCH may change on a schedule declared in orchestra.toml (pause, resume).
CONFIG_EDITABLE = frozenset({"enabled"})
#: Fields that move a schedule's next tick when they change.
_TIMING = frozenset({"cron", "timezone", "every", "enabled"})
#: How soon a tick is tried again when this host could not compute the schedule's ticks (see
#: :class:`~orchestra.schedules.TimingUnusable`): the tick is recorded as failed, and the
#: schedule waits this long instead of its next tick, which is unknown. Meanwhile the host may
#: get the zone, or another host sharing the database that knows it fires the retry.
RETRY_UNUSABLE = timedelta(minutes=1)


def submission(spec: ScheduleSpec) -> SubmitTask:
    """The task one tick of ``spec`` submits (validated as any submit is)."""
    return SubmitTask(
        template=spec.template,
        params=spec.params,
        priority=spec.priority,
        model=spec.model,
        max_attempts=spec.options.max_attempts,
        timeout=spec.options.timeout,
    )


class ScheduleView(msgspec.Struct, frozen=True):
    """A schedule with its next ticks and its latest fires (newest first); ``timing_error``:
    why this host cannot compute its ticks (then ``next_times`` is empty)."""

    schedule: Schedule
    next_times: list[str]
    fires: list[Fire]
    timing_error: str | None = None


class ScheduleService:
    """What the API (and the start of the service) can do with schedules.

    ``clock`` gives the current time (tests replace it); ``wake`` is called after each change,
    so that this process's loop looks at the schedules again at once.
    """

    def __init__(
        self,
        store: ScheduleStore,
        tasks: TaskService,
        *,
        clock: Callable[[], datetime] = now,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.clock = clock
        self.wake = wake

    async def _checked(self, spec: ScheduleSpec) -> float | None:
        """Check a spec as a submit of its task would be; returns its ``every`` in seconds.

        Raises:
            InvalidRequest: bad timing (cron, every, timezone).
            InvalidParams: the parameters do not fit the template.
            TemplateNotFound: no such template.
        """
        every = check(spec)
        await self.tasks.prepare(submission(spec))
        return every

    def _next_tick(self, spec: ScheduleSpec, every: float | None, created_at: str) -> str | None:
        """The next tick after now, as stored; None for a paused schedule."""
        if not spec.enabled:
            return None
        timing = Timing(spec.cron, spec.timezone, every, parse_time(created_at))
        return iso(next_after(timing, self.clock()))

    async def create(self, spec: ScheduleSpec) -> Schedule:
        """Store a new schedule after checking it.

        Raises:
            InvalidRequest, InvalidParams, TemplateNotFound: see :meth:`_checked`.
            ConflictError: the name is taken.
        """
        every = await self._checked(spec)
        at = iso(self.clock())
        made = await self.store.create(spec, every, self._next_tick(spec, every, at), at)
        metrics.schedules_known([made.name])
        log.info("schedule.created", schedule=made.name, next_fire_at=made.next_fire_at)
        self.wake()
        return made

    async def get(self, ref: str) -> Schedule:
        """The schedule a path names: its id (digits) or its name.

        Raises:
            ScheduleNotFound: no such schedule.
        """
        key: int | str = ref
        if ref.isdigit():
            key = int(ref) if storable_id(int(ref)) else 0
        found = await self.store.get(key) if key else None
        if found is None:
            raise ScheduleNotFound(f"no schedule {ref!r}")
        return found

    async def view(self, ref: str, *, next_count: int = 5, fires: int = 10) -> ScheduleView:
        """A schedule with its next ``next_count`` ticks and its latest ``fires``.

        Raises:
            ScheduleNotFound: no such schedule.
        """
        schedule = await self.get(ref)
        times: list[str] = []
        problem: str | None = None
        if schedule.next_fire_at is not None:
            first = parse_time(schedule.next_fire_at)
            try:
                later = upcoming(schedule.timing, first, next_count - 1)
            except TimingUnusable as exc:
                problem = exc.message
            else:
                times = [schedule.next_fire_at] + [iso(t) for t in later]
        recorded = await self.store.fires(schedule.id, fires)
        return ScheduleView(schedule, times, recorded, problem)

    async def list(self, after: str | None = None, limit: int | None = None) -> list[Schedule]:
        """Schedules by name: every one, or the first ``limit`` named after ``after``."""
        return await self.store.all(after, limit)

    async def run_now(self, ref: str, *, key_id: str | None = None) -> Task:
        """Submit the task a tick of the schedule would, now, as a submit by ``key_id``: not a
        tick (nothing is recorded among its ticks, its next tick stays), paused or not.

        Raises:
            NotFoundError: no such schedule, or its template is gone.
            InvalidRequest: its parameters no longer fit its template (each named).
        """
        schedule = await self.get(ref)
        made = await self.tasks.submit(submission(schedule.spec), key_id=key_id)
        log.info("schedule.run_now", schedule=schedule.name, task_id=made.task.id)
        return made.task

    async def latest_fires(self) -> dict[int, Fire]:
        """Every schedule's latest tick, by schedule id (for a list of schedules)."""
        return await self.store.latest_fires()

    async def update(self, ref: str, changes: ScheduleChanges) -> Schedule:
        """Change a schedule, checked as a new one is. Its next tick is computed again when
        its timing changes or it is resumed; otherwise it stays.

        Raises:
            ScheduleNotFound: no such schedule.
            ConflictError: the new name is taken, or the schedule is declared in
                orchestra.toml and the change is more than pausing or resuming it.
            InvalidRequest, InvalidParams, TemplateNotFound: see :meth:`_checked`.
        """
        old = await self.get(ref)
        given = changes.given()
        if old.source == "config" and not set(given) <= CONFIG_EDITABLE:
            raise ConflictError(
                f"schedule {old.name!r} is declared in the settings' [[schedules]]: change it "
                "there (only enabled can be changed here)"
            )
        spec = changes.apply(old.spec)
        if spec.cron is not None and "every" not in given and "cron" in given:
            spec = msgspec.structs.replace(spec, every=None)  # a cron replaces an every
        elif spec.every is not None and "cron" not in given and "every" in given:
            spec = msgspec.structs.replace(spec, cron=None)
        if set(given) <= {"enabled"} and not spec.enabled:
            # Pausing needs no check: it is what a schedule whose template was deleted or
            # changed under it needs (its every tick fails meanwhile).
            every = old.every_seconds
        else:
            every = await self._checked(spec)
        next_at = old.next_fire_at
        if any(getattr(old.spec, k) != getattr(spec, k) for k in _TIMING & set(given)):
            next_at = self._next_tick(spec, every, old.created_at)
        changed = await self.store.replace(old.id, spec, every, next_at, iso(self.clock()))
        if changed is None:
            raise ScheduleNotFound(f"no schedule {ref!r}")
        log.info("schedule.changed", schedule=changed.name, fields=sorted(given))
        if changed.name != old.name:  # its counters' zeros, as at its creation
            metrics.schedules_known([changed.name])
        self.wake()
        return changed

    async def delete(self, ref: str) -> None:
        """Delete a schedule; the tasks it made stay.

        Raises:
            ScheduleNotFound: no such schedule.
            ConflictError: it is declared in orchestra.toml (remove it there).
        """
        old = await self.get(ref)
        if old.source == "config":
            raise ConflictError(
                f"schedule {old.name!r} is declared in the settings' [[schedules]]: remove it there"
            )
        if not await self.store.delete(old.id):
            raise ScheduleNotFound(f"no schedule {ref!r}")
        log.info("schedule.deleted", schedule=old.name)
        self.wake()

    async def sync(self, declared: Sequence[ScheduleSpec]) -> None:
        """Make the schedules declared in the settings the stored ``config`` ones (see
        :meth:`~orchestra.db.schedules.ScheduleStore.sync`), each checked as a new one is.

        Raises:
            ConfigError: a declared schedule is wrong (its timing, template or parameters),
                or its name is a schedule made through the API.
        """
        checked: list[tuple[ScheduleSpec, float | None]] = []
        for spec in declared:
            try:
                checked.append((spec, await self._checked(spec)))
            except (InvalidRequest, NotFoundError) as exc:
                raise ConfigError(f"schedules: {spec.name}: {told(exc)}") from None
        done = await self.store.sync(checked, self._next_tick, iso(self.clock()))
        if any(done.values()):
            log.info("schedules.synced", **done)
        self.wake()


def told(exc: NotFoundError | InvalidRequest) -> str:
    """An error's message with each field it names ("1 invalid parameter(s) …; params.text:
    is not of type 'integer'"), for a fire's record and the log."""
    return exc.message + "".join(f"; {f.field}: {f.message}" for f in getattr(exc, "fields", []))


async def fire_due(
    service: ScheduleService,
    schedule: Schedule,
    grace: float,
) -> Fired | None:
    """Fire what is due of ``schedule`` now (see :func:`~orchestra.schedules.plan`); None
    when nothing is. A due tick this host cannot compute the next of fails, on its own, and
    is tried again after :data:`RETRY_UNUSABLE`."""
    if schedule.next_fire_at is None:
        return None
    moment = service.clock()
    tick = parse_time(schedule.next_fire_at)
    error: str | None = None
    try:
        due = plan(schedule.timing, tick, schedule.spec.catch_up, moment, grace)
    except TimingUnusable as exc:
        due = Plan(fire_at=tick, next_at=moment + RETRY_UNUSABLE)
        error = exc.message
    if due is None:
        return None
    task: NewTask | None = None
    if due.fire_at is not None and error is None:
        try:
            task = await service.tasks.prepare(submission(schedule.spec))
        except (NotFoundError, InvalidRequest) as exc:  # the template changed since
            error = told(exc)
    fired = await service.store.fire(
        schedule,
        fire_at=None if due.fire_at is None else iso(due.fire_at),
        next_at=iso(due.next_at),
        task=task,
        error=error,
        at=iso(moment),
        missed=None if due.missed is None else (iso(due.missed[0]), iso(due.missed[1])),
    )
    if fired.outcome == "submitted" and task is not None:
        metrics.task_submitted(task.template)
    if fired.outcome != "lost" and due.missed is not None:  # recorded as one missed tick
        metrics.schedule_ticked(schedule.name, "missed")
    if fired.outcome in ("submitted", "skipped", "failed"):
        metrics.schedule_ticked(schedule.name, fired.outcome)
    if fired.outcome != "lost":
        logs.by_outcome(log, fired.outcome == "failed")(
            "schedule.fired",
            schedule=schedule.name,
            tick=schedule.next_fire_at if due.fire_at is None else iso(due.fire_at),
            outcome=fired.outcome,
            task_id=fired.task_id,
            reason=fired.reason,  # why no task: a skip's earlier task, a failure's error
            missed=fired.missed,  # the ticks missed before this one, if any
            next_fire_at=iso(due.next_at),
        )
    return fired


class ScheduleLoop:
    """Fires due ticks until cancelled.

    Args:
        interval: the longest sleep, so that schedules other processes change are seen.
        grace: seconds a tick may be late and still fire as usual (later: it was missed).
        queued: called after a tick queued a task (wakes this process's workers).
    """

    def __init__(
        self,
        service: ScheduleService,
        *,
        interval: float = 1.0,
        grace: float = 30.0,
        queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.service = service
        self.interval = interval
        self.grace = grace
        self.queued = queued
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the schedules again now (one changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Fire, sleep until the next tick, repeat; a failure is logged and tried again."""
        outage = logs.Outage(log, "scheduler.step_failed")
        try:  # the tick counters' zeros: nothing worth stopping the loop for
            metrics.schedules_known(s.name for s in await self.service.list())
        except Exception as exc:
            log.warning("scheduler.counters_not_started", error=str(exc) or type(exc).__name__)
        while True:
            try:
                pause = await self.step()
                outage.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outage.failed(exc)
                pause = self.interval
            if pause > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._wake.wait()

    async def step(self) -> float:
        """Fire every tick due now; returns how long to sleep (0: look again at once)."""
        store = self.service.store
        earliest = await store.earliest()
        moment = self.service.clock()
        if earliest is None:
            return self.interval
        wait = (parse_time(earliest) - moment).total_seconds()
        if wait > 0:
            return min(self.interval, wait)
        fired_any = False
        for schedule in await store.due(iso(moment)):
            fired = await fire_due(self.service, schedule, self.grace)
            if fired is not None and fired.outcome == "submitted":
                fired_any = True
        if fired_any:
            self.queued()
        return 0.0
