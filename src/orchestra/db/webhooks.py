"""Webhook subscriptions and their outbox: every statement about webhooks.

- :func:`orchestra.db.outbox.append_events` runs inside the transaction that appends a task
  event (:mod:`~orchestra.db.events`): a delivery row for each enabled subscription the event
  matches is written with the event (PostgreSQL: one ``INSERT … SELECT`` with the event's
  INSERT as a CTE; SQLite: the outbox trigger), so an event and its deliveries commit
  together.
- :class:`WebhookStore` is the rest: subscriptions, the sender's claim (a lease, as the task
  queue's: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), each attempt's record, the listing and
  redelivery.

A claimed delivery's ``next_attempt_at`` is moved to its lease's end: a sender that dies
mid-send leaves a row that is due again when the lease runs out, and its later writes are
guarded by ``lease_owner`` so a stale sender cannot overwrite a newer one's outcome.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import msgspec
from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    update,
)

from orchestra.db.engine import Database
from orchestra.db.outbox import Hint as Hint
from orchestra.db.prepared import Prepared, insert_of
from orchestra.db.tables import (
    webhook_attempts,
    webhook_deliveries,
    webhook_secrets,
    webhooks,
)
from orchestra.domain import NewTask
from orchestra.webhooks import (
    Claimed,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Webhook,
)

_d = webhook_deliveries
_w = webhooks
#: The ``next_attempt_at`` of a paused subscription's pending deliveries: after every other.
PAUSED = "9999-12-31T23:59:59.999999Z"


#: Waiting deliveries :meth:`WebhookStore.outlines` counts at most (a paused subscription may
#: hold a large backlog, and the list is read on each view).
COUNT_CAP = 100_000


class Outline(msgspec.Struct, frozen=True):
    """A subscription at a glance: its deliveries waiting to be sent (or retried; ``more``:
    at least that many, the count stopped at :data:`COUNT_CAP`), and its latest delivery's
    status and when that was written or ended."""

    waiting: int
    more: bool
    last_status: DeliveryStatus
    last_at: str


# -- the sender's claim ---------------------------------------------------------------------


def _due(now: Any) -> ColumnElement[bool]:
    """A delivery still to send whose time has come at ``now``, of an enabled subscription
    (a disabled one's wait: they go once it is enabled again)."""
    enabled = select(_w.c.id).where(_w.c.id == _d.c.webhook_id, _w.c.enabled == 1)
    return and_(
        _d.c.status == DeliveryStatus.PENDING.value,
        _d.c.next_attempt_at <= now,
        enabled.exists(),
    )


def _claim_statement(engine: str, skip: Sequence[int] = ()) -> Any:
    """The claim's UPDATE … RETURNING of the oldest due deliveries, leaving out those of the
    subscriptions ``skip`` names (their host is at its limit in the claiming process)."""
    due = (
        select(_d.c.id)
        .where(_due(bindparam("now")))
        .order_by(_d.c.next_attempt_at, _d.c.id)
        .limit(bindparam("limit", type_=Integer))
    )
    if skip:
        due = due.where(_d.c.webhook_id.not_in(list(skip)))
    chosen: ColumnElement[bool]
    if engine == "postgresql":
        picked = due.with_for_update(skip_locked=True).cte("due")
        chosen = _d.c.id == picked.c.id
    else:
        chosen = _d.c.id.in_(due)
    return (
        update(_d)
        .where(chosen, _d.c.status == DeliveryStatus.PENDING.value)
        .values(
            lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("expires"),
            next_attempt_at=bindparam("expires"),
            attempts=_d.c.attempts + 1,
        )
        .returning(
            _d.c.id,
            _d.c.webhook_id,
            _d.c.payload,
            _d.c.attempts,
            func.coalesce(_d.c.retry_from, _d.c.created_at).label("retry_from"),
            _d.c.created_at,
        )
    )


_CLAIM = Prepared(_claim_statement)


def _guard() -> ColumnElement[bool]:
    """The lease guard of a sender's writes: still pending, under this lease and attempt."""
    return and_(
        _d.c.id == bindparam("g_id"),
        _d.c.status == DeliveryStatus.PENDING.value,
        _d.c.lease_owner == bindparam("g_owner"),
        _d.c.attempts == bindparam("g_attempt"),
    )


def _secret_statement(engine: str) -> Any:
    return (
        insert_of(engine)(webhook_secrets)
        .values(name=bindparam("name"), secret=bindparam("secret"), created_at=bindparam("at"))
        .on_conflict_do_nothing(index_elements=["name"])
    )


_SECRET = Prepared(_secret_statement)


class WebhookStore:
    """Webhook subscriptions and deliveries in the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- subscriptions ----------------------------------------------------------------------

    async def create(self, hook: Webhook, secret: str) -> Webhook:
        """Store a subscription (its ``id`` is ignored); returns it with its id."""
        values = {
            "url": hook.url,
            "event_types": msgspec.json.encode(hook.event_types).decode(),
            "template": hook.template,
            "task_id": hook.task_id,
            "secret": secret,
            "enabled": 1 if hook.enabled else 0,
            "created_at": hook.created_at,
        }
        new_id = await self.db.transaction(
            lambda conn: int(
                conn.execute(insert(_w).values(values).returning(_w.c.id)).scalar_one()
            ),
            small=True,
        )
        return msgspec.structs.replace(hook, id=new_id)

    async def enqueue_with_callback(
        self, new: NewTask, at: str, callback: dict[str, Any]
    ) -> dict[str, Any] | None:
        """:func:`~orchestra.db.queue.enqueue` with the task's callback subscription
        (``callback``: its ``webhooks`` values but the task id) in the same transaction, so
        that no event of the task can come before it. None: the idempotency key was used."""

        from orchestra.db import queue  # queue appends events, which write deliveries

        def work(conn: Connection) -> dict[str, Any] | None:
            row = queue.enqueue(conn, new, at)
            if row is not None:
                conn.execute(insert(_w).values({**callback, "task_id": row["id"]}))
            return row

        return await self.db.transaction(work, small=True)

    async def subscriptions(
        self, after: int | None = None, limit: int | None = None
    ) -> list[Webhook]:
        """Subscriptions (not tasks' callbacks), oldest first: every one, or the first
        ``limit`` after the id ``after``."""
        query = select(_w).where(_w.c.task_id.is_(None)).order_by(_w.c.id)
        if after is not None:
            query = query.where(_w.c.id > after)
        if limit is not None:
            query = query.limit(limit)
        async with self.db.read() as conn:
            return [_webhook(r._mapping) for r in (await conn.execute(query)).all()]

    async def get(self, webhook_id: int) -> Webhook | None:
        """One subscription (or callback), or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(_w).where(_w.c.id == webhook_id))).one_or_none()
        return None if row is None else _webhook(row._mapping)

    async def update(self, webhook_id: int, values: dict[str, Any], at: str = "") -> Webhook | None:
        """Change a subscription's ``values`` (columns of ``webhooks``); None when no
        subscription (a callback is none) has this id.

        Pausing it (``enabled`` 0) moves its pending deliveries not being sent to
        :data:`PAUSED`: left due, each claim's walk of the due index would pass over all of
        them (a paused receiver's backlog of 200,000 cost every poll 60 ms). Enabling it makes
        them due again at ``at``."""
        if "event_types" in values:
            values = {**values, "event_types": msgspec.json.encode(values["event_types"]).decode()}
        statement = (
            update(_w)
            .where(_w.c.id == webhook_id, _w.c.task_id.is_(None))
            .values(values)
            .returning(*_w.c)
        )
        waiting = and_(_d.c.webhook_id == webhook_id, _d.c.status == DeliveryStatus.PENDING.value)
        if values.get("enabled") == 0:
            moved = update(_d).where(waiting, _d.c.lease_owner.is_(None))
            moved = moved.values(next_attempt_at=PAUSED)
        elif values.get("enabled") == 1:  # a redelivery made while paused: its window too
            moved = update(_d).where(waiting, _d.c.next_attempt_at == PAUSED)
            window = case((_d.c.retry_from == PAUSED, at), else_=_d.c.retry_from)
            moved = moved.values(next_attempt_at=at, retry_from=window)
        else:
            moved = None

        def work(conn: Connection) -> Webhook | None:
            row = conn.execute(statement).one_or_none()
            if row is None:
                return None
            if moved is not None:
                conn.execute(moved)
            return _webhook(row._mapping)

        return await self.db.transaction(work, small=True)

    async def roll_secret(self, webhook_id: int, secret: str, until: str) -> Webhook | None:
        """Make ``secret`` the subscription's, the one it replaces signing beside it until
        ``until``; None when no subscription has this id."""
        return await self.update(
            webhook_id,
            # Each SET reads the row as it was: the old secret becomes the previous one.
            {"secret": secret, "previous_secret": _w.c.secret, "previous_secret_until": until},
        )

    async def delete(self, webhook_id: int) -> bool:
        """Delete a subscription with its deliveries; False when there was none."""

        def work(conn: Connection) -> bool:
            # Attempts first: SQLite cascades only where foreign keys are enforced.
            owned = select(_d.c.id).where(_d.c.webhook_id == webhook_id)
            conn.execute(delete(webhook_attempts).where(webhook_attempts.c.delivery_id.in_(owned)))
            conn.execute(delete(_d).where(_d.c.webhook_id == webhook_id))
            return bool(conn.execute(delete(_w).where(_w.c.id == webhook_id)).rowcount)

        return await self.db.transaction(work)

    async def shared_secret(self, name: str, candidate: str, at: str) -> str:
        """The server-wide secret ``name``: the one stored, else ``candidate``, stored now
        (the first process to ask wins; the others read its secret)."""

        def work(conn: Connection) -> str:
            _SECRET.run(conn, {"name": name, "secret": candidate, "at": at})
            query = select(webhook_secrets.c.secret).where(webhook_secrets.c.name == name)
            return str(conn.execute(query).scalar_one())

        return await self.db.transaction(work, small=True)

    # -- deliveries -------------------------------------------------------------------------

    async def deliveries(
        self, webhook_id: int, limit: int = 50, before: int | None = None
    ) -> list[Delivery]:
        """A subscription's deliveries, newest first, each with its attempts."""
        query = select(_d).where(_d.c.webhook_id == webhook_id).order_by(_d.c.id.desc())
        if before is not None:
            query = query.where(_d.c.id < before)
        async with self.db.read() as conn:
            rows = (await conn.execute(query.limit(limit))).all()
            ids = [r.id for r in rows]
            tried = (
                await conn.execute(
                    select(webhook_attempts)
                    .where(webhook_attempts.c.delivery_id.in_(ids))
                    .order_by(webhook_attempts.c.delivery_id, webhook_attempts.c.attempt)
                )
            ).all()
        by_delivery: dict[int, list[DeliveryAttempt]] = {}
        for a in tried:
            by_delivery.setdefault(a.delivery_id, []).append(
                DeliveryAttempt(
                    attempt=a.attempt,
                    time=a.time,
                    status_code=a.status_code,
                    latency_ms=a.latency_ms,
                    response=a.response,
                    error=a.error,
                )
            )
        return [_delivery(r._mapping, by_delivery.get(r.id, [])) for r in rows]

    async def redeliver(self, webhook_id: int, delivery_id: int, at: str) -> bool:
        """Make a delivery due now again (delivered, failed or still pending), with the same
        id and body, its retry window starting again; False when the subscription has no such
        delivery. A paused subscription's waits for its resume (:data:`PAUSED`), as its other
        pending ones do, and its window starts at the resume. The subscription's row is locked
        first, as a pause or a resume locks it: a resume that commits meanwhile cannot miss
        the delivery written paused."""

        def work(conn: Connection) -> bool:
            enabled = conn.execute(
                select(_w.c.enabled).where(_w.c.id == webhook_id).with_for_update()
            ).scalar()
            if enabled is None:
                return False
            due = at if enabled else PAUSED
            statement = (
                update(_d)
                .where(_d.c.id == delivery_id, _d.c.webhook_id == webhook_id)
                .values(
                    status=DeliveryStatus.PENDING.value,
                    next_attempt_at=due,
                    retry_from=due,  # the retry window starts again (paused: at the resume)
                    finished_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            return bool(conn.execute(statement).rowcount)

        return await self.db.transaction(work, small=True)

    async def any_due(self, now: str) -> bool:
        """Whether a delivery is due at ``now``: one indexed read, so that a sender with
        nothing to send writes nothing (an idle service's poll is no transaction)."""
        query = select(_d.c.id).where(_due(now)).limit(1)
        async with self.db.read() as conn:
            return (await conn.execute(query)).first() is not None

    async def claim(
        self, owner: str, limit: int, now: str, expires: str, skip: Collection[int] = ()
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries to ``owner`` until ``expires``, oldest due
        first, each with its subscription's URL and secret, none of the subscriptions
        ``skip`` names. One process's claim never returns a delivery another holds."""

        def work(conn: Connection) -> list[Claimed]:
            params = {"now": now, "limit": limit, "owner": owner, "expires": expires}
            if skip:  # rare (a host at its limit): built for the list it names
                statement = _claim_statement(conn.dialect.name, sorted(skip))
                rows = [dict(r._mapping) for r in conn.execute(statement, params)]
            else:
                rows = _CLAIM.rows(conn, params)
            if not rows:
                return []
            ids = sorted({r["webhook_id"] for r in rows})
            columns = (_w.c.id, _w.c.url, _w.c.secret, _w.c.previous_secret)
            still = _w.c.previous_secret_until > now
            hooks = {
                h.id: h
                for h in conn.execute(
                    select(*columns, still.label("previous_signs")).where(_w.c.id.in_(ids))
                ).all()
            }
            return [
                Claimed(
                    id=r["id"],
                    webhook_id=r["webhook_id"],
                    url=hooks[r["webhook_id"]].url,
                    secret=hooks[r["webhook_id"]].secret,
                    payload=r["payload"],
                    attempt=r["attempts"],
                    retry_from=r["retry_from"],
                    created_at=r["created_at"],
                    previous_secret=(
                        hooks[r["webhook_id"]].previous_secret
                        if hooks[r["webhook_id"]].previous_signs
                        else None
                    ),
                )
                for r in rows
                if r["webhook_id"] in hooks
            ]

        return await self.db.transaction(work, small=True)

    async def release(self, owner: str, delivery: Claimed, due: str) -> None:
        """Give a claimed delivery back unsent (its host was busy): due at ``due``, the
        attempt not counted."""
        statement = (
            update(_d)
            .where(_guard())
            .values(
                next_attempt_at=due,
                lease_owner=None,
                lease_expires_at=None,
                attempts=_d.c.attempts - 1,
            )
        )
        params = {"g_id": delivery.id, "g_owner": owner, "g_attempt": delivery.attempt}
        await self.db.transaction(lambda conn: conn.execute(statement, params), small=True)

    async def record(
        self,
        owner: str,
        delivery: Claimed,
        tried: DeliveryAttempt,
        status: DeliveryStatus,
        next_at: str | None,
    ) -> bool:
        """Record an attempt and the delivery's state after it: delivered, failed for good,
        or pending again at ``next_at``. False when the lease was lost (a redelivery asked
        meanwhile, or the lease ran out): the delivery is another send's now, and only the
        attempt is written (it was made: "every attempt is recorded"), unless the delivery is
        gone with its subscription."""
        guard = {"g_id": delivery.id, "g_owner": owner, "g_attempt": delivery.attempt}
        values: dict[str, Any] = {"status": status.value, "lease_owner": None}
        values["lease_expires_at"] = None
        if status is DeliveryStatus.PENDING:
            values["next_attempt_at"] = next_at
        else:
            values["finished_at"] = tried.time
        statement = update(_d).where(_guard()).values(values)
        attempt_row = {"delivery_id": delivery.id, **msgspec.structs.asdict(tried)}
        # Locked: a subscription's delete cannot take the delivery before its attempt is in.
        kept = select(_d.c.id).where(_d.c.id == delivery.id).with_for_update()

        def work(conn: Connection) -> bool:
            ours = bool(conn.execute(statement, guard).rowcount)
            if not ours and conn.execute(kept).first() is None:
                return False
            insert_attempt = insert_of(conn.dialect.name)(webhook_attempts).values(attempt_row)
            conn.execute(insert_attempt.on_conflict_do_nothing())
            return ours

        return await self.db.transaction(work, small=True)

    async def pending_count(self) -> int:
        """Deliveries not yet delivered nor given up (for tests and health)."""
        query = select(func.count()).where(_d.c.status == DeliveryStatus.PENDING.value)
        async with self.db.read() as conn:
            return int((await conn.execute(query.select_from(_d))).scalar_one())

    async def outlines(self) -> dict[int, Outline]:
        """For a list of subscriptions: each one's deliveries waiting to be sent and its
        latest delivery (by subscription id; one without deliveries is left out). Both are
        read by index: the waiting ones by status (at most :data:`COUNT_CAP` of them: past
        it, the counts are lower bounds), the latest by (subscription, id)."""
        pending = _d.c.status == DeliveryStatus.PENDING.value
        some = select(_d.c.webhook_id).where(pending).limit(COUNT_CAP + 1).subquery()
        waiting = select(some.c.webhook_id, func.count().label("n")).group_by(some.c.webhook_id)
        each = _d.alias("each_delivery")
        newest = (
            select(func.max(each.c.id))
            .where(each.c.webhook_id == _w.c.id)
            .correlate(_w)
            .scalar_subquery()
        )
        latest = (
            select(_w.c.id, _d.c.status, _d.c.created_at, _d.c.finished_at)
            .select_from(_w.join(_d, _d.c.id == newest))
            .where(_w.c.task_id.is_(None))
        )
        async with self.db.read() as conn:
            counts = {r.webhook_id: r.n for r in (await conn.execute(waiting)).all()}
            rows = (await conn.execute(latest)).all()
        more = sum(counts.values()) > COUNT_CAP
        return {
            r.id: Outline(
                counts.get(r.id, 0), more, DeliveryStatus(r.status), r.finished_at or r.created_at
            )
            for r in rows
        }


def _webhook(m: Any) -> Webhook:
    return Webhook(
        id=m["id"],
        url=m["url"],
        event_types=msgspec.json.decode(m["event_types"], type=list[str]),
        template=m["template"],
        task_id=m["task_id"],
        enabled=bool(m["enabled"]),
        created_at=m["created_at"],
        previous_secret_until=m["previous_secret_until"],
    )


def _delivery(m: Any, tried: list[DeliveryAttempt]) -> Delivery:
    return Delivery(
        id=m["id"],
        webhook_id=m["webhook_id"],
        task_id=m["task_id"],
        event_seq=m["event_seq"],
        type=m["type"],
        status=DeliveryStatus(m["status"]),
        attempts=m["attempts"],
        next_attempt_at=m["next_attempt_at"] if m["status"] == "pending" else None,
        created_at=m["created_at"],
        finished_at=m["finished_at"],
        payload=msgspec.json.decode(m["payload"]),
        history=tried,
    )
