"""Queries for schedules and their fires.

A tick fires in one transaction (:meth:`ScheduleStore.fire`): move the schedule's
``next_fire_at`` on, guarded by the value it had (a process that lost the race to another
matches no row); insert the ``schedule_fires`` row of (schedule, tick) — ON CONFLICT DO
NOTHING, so a tick fired already is a normal outcome, not an error that re-runs the body on
PostgreSQL; then queue the task (:func:`orchestra.db.queue.enqueue`) and record its id. The
row's primary key is the guarantee that one tick makes at most one task, however many
processes share the database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
from sqlalchemy import Connection, delete, desc, func, insert, select, update

from orchestra.db import queue
from orchestra.db.engine import Database
from orchestra.db.prepared import insert_for
from orchestra.db.rows import dump, load
from orchestra.db.tables import schedule_fires, schedules, tasks
from orchestra.domain import ACTIVE, NewTask
from orchestra.errors import ConfigError, ConflictError, FieldProblem
from orchestra.schedules import Schedule, ScheduleSpec, Source, TaskOptions, format_every

#: What one call of :meth:`ScheduleStore.fire` did: the tick made a task (submitted), was
#: skipped (the previous task is unfinished), could not make one (failed); or nothing was
#: fired: the ticks were missed (downtime, catch_up none), another process had moved the
#: schedule on (lost), or this tick had fired already (duplicate).
Outcome = Literal["submitted", "skipped", "failed", "missed", "lost", "duplicate"]

#: The column of every field of a spec but ``every`` (stored in seconds) and ``options``.
_SPEC_COLUMNS = ("name", "template", "model", "priority", "cron", "timezone", "overlap", "catch_up")

#: What a create or rename that takes a used name is refused for.
_NAME_TAKEN = [FieldProblem("name", "is taken by another schedule")]


class Fired(msgspec.Struct, frozen=True):
    """The outcome of a fire, the task it made, why none was made (as recorded), and which
    ticks before it were missed (as their ``missed`` record says)."""

    outcome: Outcome
    task_id: int | None = None
    reason: str | None = None
    missed: str | None = None


class Fire(msgspec.Struct, frozen=True):
    """One tick of a schedule, as recorded, with its task's status (None: no task, or the
    task was deleted since)."""

    fire_at: str
    outcome: str
    task_id: int | None
    task_status: str | None
    error: str | None
    time: str


def _schedule(row: Any) -> Schedule:
    spec = ScheduleSpec(
        name=row.name,
        template=row.template,
        params=load(row.params),
        model=row.model,
        priority=row.priority,
        options=msgspec.convert(load(row.options), TaskOptions),
        cron=row.cron,
        timezone=row.timezone,
        every=None if row.every_seconds is None else format_every(row.every_seconds),
        enabled=bool(row.enabled),
        overlap=row.overlap,
        catch_up=row.catch_up,
    )
    return Schedule(
        id=row.id,
        spec=spec,
        every_seconds=row.every_seconds,
        next_fire_at=row.next_fire_at,
        source=row.source,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _values(spec: ScheduleSpec, every_seconds: float | None) -> dict[str, Any]:
    """A spec's columns."""
    return {
        **{c: getattr(spec, c) for c in _SPEC_COLUMNS},
        "params": dump(spec.params),
        "options": dump(spec.options),
        "every_seconds": every_seconds,
        "enabled": int(spec.enabled),
    }


def _name_taken(conn: Connection, name: str, other_than: int | None = None) -> bool:
    query = select(schedules.c.id).where(schedules.c.name == name)
    if other_than is not None:
        query = query.where(schedules.c.id != other_than)
    return conn.execute(query).first() is not None


#: ``next_fire_at(spec, every_seconds, created_at)``: a schedule's next tick as stored (None
#: while paused), for :meth:`ScheduleStore.sync`.
NextTick = Callable[[ScheduleSpec, float | None, str], str | None]


class ScheduleStore:
    """Schedules and their fires in the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        spec: ScheduleSpec,
        every_seconds: float | None,
        next_fire_at: str | None,
        at: str,
        source: Source = "api",
    ) -> Schedule:
        """Store a new schedule, made at ``at``.

        Raises:
            ConflictError: a schedule has this name already.
        """
        row = {
            **_values(spec, every_seconds),
            "next_fire_at": next_fire_at,
            "source": source,
            "created_at": at,
            "updated_at": at,
        }

        def work(conn: Connection) -> Any:
            statement = (
                insert_for(conn)(schedules)
                .values(row)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(*schedules.c)
            )
            return conn.execute(statement).first()

        made = await self.db.transaction(work)
        if made is None:
            raise ConflictError(
                f"a schedule named {spec.name!r} exists already", fields=_NAME_TAKEN
            )
        return _schedule(made)

    async def get(self, ref: int | str) -> Schedule | None:
        """The schedule with this id (an int) or name (a str)."""
        column = schedules.c.id if isinstance(ref, int) else schedules.c.name
        async with self.db.read() as conn:
            row = (await conn.execute(select(schedules).where(column == ref))).first()
        return None if row is None else _schedule(row)

    async def all(self, after: str | None = None, limit: int | None = None) -> list[Schedule]:
        """Schedules by name: every one, or the first ``limit`` named after ``after``."""
        query = select(schedules).order_by(schedules.c.name)
        if after is not None:
            query = query.where(schedules.c.name > after)
        if limit is not None:
            query = query.limit(limit)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_schedule(r) for r in rows]

    async def replace(
        self,
        schedule_id: int,
        spec: ScheduleSpec,
        every_seconds: float | None,
        next_fire_at: str | None,
        at: str,
    ) -> Schedule | None:
        """Store ``spec`` as the schedule's, with its next tick; None when it is gone.

        Raises:
            ConflictError: another schedule has the new name.
        """
        values = {**_values(spec, every_seconds), "next_fire_at": next_fire_at, "updated_at": at}
        statement = (
            update(schedules)
            .where(schedules.c.id == schedule_id)
            .values(values)
            .returning(*schedules.c)
        )

        def work(conn: Connection) -> Any:
            if _name_taken(conn, spec.name, other_than=schedule_id):
                raise ConflictError(
                    f"a schedule named {spec.name!r} exists already", fields=_NAME_TAKEN
                )
            return conn.execute(statement).first()

        row = await self.db.transaction(work)
        return None if row is None else _schedule(row)

    async def delete(self, schedule_id: int) -> bool:
        """Delete a schedule and its fire records (the tasks it made stay); False when there
        was none."""
        statement = delete(schedules).where(schedules.c.id == schedule_id)

        def work(conn: Connection) -> bool:
            conn.execute(delete(schedule_fires).where(schedule_fires.c.schedule_id == schedule_id))
            return bool(conn.execute(statement).rowcount)

        return await self.db.transaction(work)

    async def earliest(self) -> str | None:
        """The earliest next tick of any enabled schedule (None: there is none)."""
        query = select(func.min(schedules.c.next_fire_at)).where(schedules.c.enabled == 1)
        async with self.db.read() as conn:
            value = (await conn.execute(query)).scalar()
        return None if value is None else str(value)

    async def due(self, at: str, limit: int = 100) -> list[Schedule]:
        """Enabled schedules whose next tick is at or before ``at``, earliest first."""
        query = (
            select(schedules)
            .where(schedules.c.enabled == 1, schedules.c.next_fire_at <= at)
            .order_by(schedules.c.next_fire_at)
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_schedule(r) for r in rows]

    async def fire(
        self,
        schedule: Schedule,
        *,
        fire_at: str | None,
        next_at: str,
        task: NewTask | None,
        error: str | None,
        at: str,
        missed: tuple[str, str] | None = None,
    ) -> Fired:
        """Fire the tick ``fire_at`` of ``schedule`` and move its next tick to ``next_at``, in
        one transaction (see the module docstring); ``fire_at`` None moves it on only (missed
        ticks). ``task`` is what the tick queues (None: it cannot, and ``error`` says why).
        With ``overlap = "skip"`` a tick whose previous task is unfinished queues nothing.
        ``missed``: the range of ticks missed meanwhile, recorded as one ``missed`` tick (at
        the first of them) saying so."""
        expected = schedule.next_fire_at
        moved = (
            update(schedules)
            .where(
                schedules.c.id == schedule.id,
                schedules.c.next_fire_at == expected,
                schedules.c.enabled == 1,
            )
            .values(next_fire_at=next_at)
            .returning(schedules.c.id)
        )
        f = schedule_fires.c
        previous = (
            select(tasks.c.status, tasks.c.id)
            .select_from(schedule_fires.join(tasks, tasks.c.id == f.task_id))
            .where(f.schedule_id == schedule.id, f.outcome == "submitted")
            .order_by(desc(f.fire_at))
            .limit(1)
        )
        busy = sorted(s.value for s in ACTIVE)

        def record(conn: Connection, fire_at: str, outcome: Outcome, error: str | None) -> Any:
            """The tick's row (none when it has one: another process fired it)."""
            return (
                insert_for(conn)(schedule_fires)
                .values(
                    schedule_id=schedule.id, fire_at=fire_at, outcome=outcome, error=error, time=at
                )
                .on_conflict_do_nothing(index_elements=["schedule_id", "fire_at"])
                .returning(f.fire_at)
            )

        def work(conn: Connection) -> Fired:
            if conn.execute(moved).first() is None:
                return Fired("lost")
            why: str | None = None
            if missed is not None:
                first, until = missed
                why = (
                    f"every tick from {first} to before {until} was missed (the service was "
                    "not running, or could not use its database)"
                )
                conn.execute(record(conn, first, "missed", why))
            if fire_at is None:
                return Fired("missed", reason=why, missed=why)
            outcome: Outcome = "submitted" if task is not None else "failed"
            told = error
            if task is not None and schedule.spec.overlap == "skip":
                last = conn.execute(previous).first()
                if last is not None and last.status in busy:
                    outcome = "skipped"
                    told = f"task {last.id}, of an earlier tick, is still {last.status}"
            # RETURNING, not rowcount: on PostgreSQL an INSERT's rowcount here is -1, row or
            # no row.
            if conn.execute(record(conn, fire_at, outcome, told)).first() is None:
                return Fired("duplicate", missed=why)
            if outcome != "submitted" or task is None:
                return Fired(outcome, reason=told, missed=why)
            row = queue.enqueue(conn, task, at)
            assert row is not None  # no idempotency key: nothing to conflict with
            conn.execute(
                update(schedule_fires)
                .where(f.schedule_id == schedule.id, f.fire_at == fire_at)
                .values(task_id=row["id"])
            )
            return Fired("submitted", row["id"], missed=why)

        return await self.db.transaction(work, small=True)

    async def fires(self, schedule_id: int, limit: int = 10) -> list[Fire]:
        """A schedule's latest recorded ticks, newest first, with their tasks' status."""
        f = schedule_fires.c
        query = (
            select(f.fire_at, f.outcome, f.task_id, f.error, f.time, tasks.c.status)
            .select_from(schedule_fires.outerjoin(tasks, tasks.c.id == f.task_id))
            .where(f.schedule_id == schedule_id)
            .order_by(desc(f.fire_at))
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [Fire(r.fire_at, r.outcome, r.task_id, r.status, r.error, r.time) for r in rows]

    async def latest_fires(self) -> dict[int, Fire]:
        """Every schedule's latest recorded tick (by schedule id), with its task's status:
        one read for a list of schedules (see :func:`latest_fires_query`)."""
        async with self.db.read() as conn:
            rows = (await conn.execute(latest_fires_query())).all()
        return {
            r.schedule_id: Fire(r.fire_at, r.outcome, r.task_id, r.status, r.error, r.time)
            for r in rows
        }

    async def sync(
        self,
        declared: Sequence[tuple[ScheduleSpec, float | None]],
        next_tick: NextTick,
        at: str,
    ) -> dict[str, list[str]]:
        """Make the config's schedules (``declared``: each spec with its ``every`` in
        seconds) the ``source = 'config'`` rows, in one transaction: add the new ones,
        update the changed ones (their next tick computed again only when their timing
        changed, so a restart keeps the ticks missed meanwhile), delete those no longer
        declared. Returns the names added, changed and deleted.

        A schedule paused (or resumed) through the API stays so across starts, whichever
        process or host starts: the file's ``enabled`` applies when it differs from the one
        it declared before (``declared_enabled``), as a change of the file.

        Raises:
            ConfigError: a schedule made through the API has a declared name.
        """
        names = [spec.name for spec, _ in declared]

        def work(conn: Connection) -> dict[str, list[str]]:
            done: dict[str, list[str]] = {"added": [], "changed": [], "deleted": []}
            stored = {
                r.name: r
                for r in conn.execute(select(schedules).where(schedules.c.name.in_(names)))
            }
            for spec, every in declared:
                row = stored.get(spec.name)
                if row is None:
                    values = {
                        **_values(spec, every),
                        "declared_enabled": int(spec.enabled),
                        "next_fire_at": next_tick(spec, every, at),
                        "source": "config",
                        "created_at": at,
                        "updated_at": at,
                    }
                    conn.execute(insert(schedules).values(values))
                    done["added"].append(spec.name)
                    continue
                if row.source != "config":
                    raise ConfigError(
                        f"schedules: {spec.name}: a schedule made through the API has this "
                        "name; rename one of them"
                    )
                old = _schedule(row)
                declaring = int(spec.enabled)
                if row.declared_enabled == declaring:  # the file's enabled as before: a pause
                    spec = msgspec.structs.replace(spec, enabled=old.spec.enabled)  # stands
                if old.spec == spec and row.declared_enabled == declaring:
                    continue
                timing = ("cron", "timezone", "every", "enabled")
                next_at = old.next_fire_at
                if any(getattr(old.spec, k) != getattr(spec, k) for k in timing):
                    next_at = next_tick(spec, every, row.created_at)
                changes = {**_values(spec, every), "declared_enabled": declaring}
                conn.execute(
                    update(schedules)
                    .where(schedules.c.id == row.id)
                    .values({**changes, "next_fire_at": next_at, "updated_at": at})
                )
                done["changed"].append(spec.name)
            gone = select(schedules.c.id, schedules.c.name).where(
                schedules.c.source == "config", schedules.c.name.not_in(names)
            )
            for gone_id, gone_name in conn.execute(gone).all():
                conn.execute(delete(schedule_fires).where(schedule_fires.c.schedule_id == gone_id))
                conn.execute(delete(schedules).where(schedules.c.id == gone_id))
                done["deleted"].append(gone_name)
            return done

        return await self.db.transaction(work)


def latest_fires_query() -> Any:
    """Each schedule's latest tick, found by the primary key of ``schedule_fires``: one
    index step per schedule, however many ticks are kept. The step is MATERIALIZED: flattened
    into the join, SQLite scanned every tick kept."""
    f = schedule_fires.c
    each = schedule_fires.alias("each_fire")
    newest = (
        select(func.max(each.c.fire_at))
        .where(each.c.schedule_id == schedules.c.id)
        .correlate(schedules)
        .scalar_subquery()
    )
    latest = (
        select(schedules.c.id, newest.label("fire_at")).cte("latest").prefix_with("MATERIALIZED")
    )
    return select(
        f.schedule_id, f.fire_at, f.outcome, f.task_id, f.error, f.time, tasks.c.status
    ).select_from(
        latest.join(
            schedule_fires, (f.schedule_id == latest.c.id) & (f.fire_at == latest.c.fire_at)
        ).outerjoin(tasks, tasks.c.id == f.task_id)
    )
