"""The store's status guards are the transition table's: every status change the store makes
starts only from the statuses ``domain.TRANSITIONS`` allows, and together the store's changes
make every transition the table allows (a new status or transition fails here until the store
handles it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from orchestra.db import Database, Lease, TaskStore, guards
from orchestra.domain import TRANSITIONS, NewTask, TaskError, TaskStatus, iso
from tests.conftest import sql_rows


def allowed_into(target: TaskStatus) -> frozenset[TaskStatus]:
    """Read straight from the table: the statuses that may move to ``target``."""
    return frozenset(s for s in TaskStatus if target in TRANSITIONS[s])


def test_may_become_is_the_transition_table_read_backwards() -> None:
    for source in TaskStatus:
        for target in TaskStatus:
            assert (source in guards.may_become(target)) == (target in TRANSITIONS[source])


def test_every_move_of_the_store_is_a_legal_transition() -> None:
    for move in guards.MOVES:
        assert move.sources and move.targets, move.name
        for source in move.sources:
            assert move.targets <= TRANSITIONS[source], (move.name, source)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_each_guard_names_its_statuses_in_the_sql_itself(dialect: str) -> None:
    # Bound (``status = ?``), SQLite planned the claim's UPDATE through the status index it
    # changes: 150 us of SQLite's time a claim instead of 35.
    from orchestra.db.prepared import _dialect

    for move in guards.MOVES:
        compiled = move.guard.compile(dialect=_dialect(dialect))
        assert not compiled.binds, move.name
        for status in move.sources:
            assert f"'{status.value}'" in compiled.string, (move.name, status)


def test_the_moves_together_make_exactly_the_transitions_the_table_allows() -> None:
    for target in TaskStatus:
        made = frozenset().union(*(m.sources for m in guards.MOVES if target in m.targets))
        assert made == allowed_into(target), target


def test_a_guard_names_one_status_as_equality_and_several_as_a_list() -> None:
    one = str(guards.status_in({TaskStatus.QUEUED}).compile(compile_kwargs={"literal_binds": True}))
    several = guards.status_in({TaskStatus.CANCELLED, TaskStatus.FAILED})
    assert one == "tasks.status = 'queued'"  # so the partial index on queued tasks applies
    assert "IN ('failed', 'cancelled')" in str(
        several.compile(compile_kwargs={"literal_binds": True})
    )
    with pytest.raises(ValueError):
        guards.status_in(set())


# -- the statements themselves, run against a real database ----------------------------------

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=1)
Operation = Callable[[TaskStore, dict[TaskStatus, int]], Awaitable[object]]


def leases(ids: dict[TaskStatus, int]) -> list[Lease]:
    return [Lease(task_id, "w", 1) for task_id in ids.values()]


async def each(ids: dict[TaskStatus, int], act: Callable[[Lease], Awaitable[object]]) -> None:
    for lease in leases(ids):
        await act(lease)


ERROR = TaskError(type="x", message="x", retryable=True)
#: Each of the store's status-changing operations, applied to one task in each status, and the
#: move it makes.
OPERATIONS: dict[str, tuple[guards.Move, Operation]] = {
    "claim": (guards.CLAIM, lambda store, ids: store.claim("w2", 10, 30)),
    "finish succeeded": (
        guards.FINISH,
        lambda store, ids: each(ids, lambda le: store.finish(le, TaskStatus.SUCCEEDED)),
    ),
    "finish failed": (
        guards.FINISH,
        lambda store, ids: each(ids, lambda le: store.finish(le, TaskStatus.FAILED, error=ERROR)),
    ),
    "finish cancelled": (
        guards.FINISH,
        lambda store, ids: each(ids, lambda le: store.finish(le, TaskStatus.CANCELLED)),
    ),
    "retry later": (
        guards.RETRY_LATER,
        lambda store, ids: each(ids, lambda le: store.retry_later(le, ERROR, LATER)),
    ),
    "release": (guards.HAND_BACK, lambda store, ids: each(ids, store.release)),
    "requeue expired": (guards.LEASE_EXPIRED, lambda store, ids: store.requeue_expired()),
    "requeue orphaned": (
        guards.LEASE_EXPIRED,
        lambda store, ids: store.requeue_orphaned("w", "process 1, pid 1: SIGKILL"),
    ),
    "cancel": (guards.CANCEL, lambda store, ids: store.cancel_many(list(ids.values()))),
    "retry": (guards.RETRY, lambda store, ids: store.retry_many(list(ids.values()))),
}


def test_every_move_is_exercised_below() -> None:
    assert {move.name for move, _ in OPERATIONS.values()} == {m.name for m in guards.MOVES}


@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_each_operation_moves_only_tasks_in_its_guards_statuses(
    db: Database, name: str
) -> None:
    move, operation = OPERATIONS[name]
    store = TaskStore(db, clock=lambda: NOW)
    ids: dict[TaskStatus, int] = {}
    for status in TaskStatus:
        task = (await store.enqueue(NewTask(template="t", template_version=1, params={}))).task
        ids[status] = task.id
    # Each task in one status, held by worker "w" (attempt 1) under a lease that has expired.
    expired = iso(NOW - timedelta(seconds=1))
    for status, task_id in ids.items():
        sql_rows(
            db.url,
            "UPDATE tasks SET status = ?, lease_owner = 'w', attempts = 1, "
            "lease_expires_at = ? WHERE id = ?",
            (status.value, expired, task_id),
        )
    await operation(store, ids)
    for source, task_id in ids.items():
        task = await store.get_task(task_id)
        assert task is not None
        moved = task.status is not source
        assert moved == (source in move.sources), (name, source, task.status)
        if moved:
            assert task.status in move.targets and task.status in TRANSITIONS[source]
