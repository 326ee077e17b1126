"""Status guards: the statuses each of the store's state changes may start from, read from
:data:`orchestra.domain.TRANSITIONS`.

Every UPDATE that changes a task's status is guarded by the statuses it expects (``WHERE
status IN (…)``), so a task that moved on meanwhile is left as it is. Those statuses are not
written by hand: each :class:`Move` takes them from the transition table, and
``tests/unit/test_status_guards.py`` checks that the moves together make exactly the
transitions the table allows — a new status or transition cannot be silently missed.
"""

from __future__ import annotations

from collections.abc import Collection

import msgspec
from sqlalchemy import ColumnElement, literal_column

from orchestra.db.tables import tasks
from orchestra.domain import TRANSITIONS, TaskStatus


def may_become(target: TaskStatus) -> frozenset[TaskStatus]:
    """The statuses from which a task may move to ``target`` (the transition table read
    backwards)."""
    return frozenset(source for source, targets in TRANSITIONS.items() if target in targets)


def status_in(statuses: Collection[TaskStatus]) -> ColumnElement[bool]:
    """``tasks.status`` is one of ``statuses``: ``= 'x'`` for one, ``IN ('x', 'y')`` for
    more, in the enum's order (stable SQL).

    The statuses are written into the SQL as literals, not bound: with ``status = ?`` SQLite
    plans an UPDATE through the status index it is about to change, and the claim took 150 µs
    of SQLite's time instead of 35 (a partial index on ``status = 'x'`` also applies only to
    a literal)."""
    values = [status.value for status in TaskStatus if status in statuses]
    if not values:
        raise ValueError("a status guard needs at least one status")
    words = [_word(value) for value in values]
    return tasks.c.status == words[0] if len(words) == 1 else tasks.c.status.in_(words)


def _word(value: str) -> ColumnElement[str]:
    """A status as an SQL string literal (statuses are lower-case words: nothing to quote)."""
    if not value.replace("_", "").isalpha():
        raise ValueError(f"not a status word: {value!r}")
    return literal_column(f"'{value}'")


#: A worker holds the task: only its lease holder (or the reaper, when the lease expired)
#: moves it on. A person's request for such a task is a flag its worker reads (a cancel).
LEASED: frozenset[TaskStatus] = frozenset({TaskStatus.RUNNING})


class Move(msgspec.Struct, frozen=True):
    """One of the store's status changes: a task in one of ``sources`` moves to one of
    ``targets``."""

    name: str
    sources: frozenset[TaskStatus]
    targets: frozenset[TaskStatus]

    @property
    def guard(self) -> ColumnElement[bool]:
        """The WHERE term that keeps the change to tasks in ``sources``."""
        return status_in(self.sources)


def _move(name: str, sources: frozenset[TaskStatus], *targets: TaskStatus) -> Move:
    return Move(name=name, sources=sources, targets=frozenset(targets))


_S = TaskStatus
#: A worker claims a due task.
CLAIM = _move("claim", may_become(_S.RUNNING), _S.RUNNING)
#: The lease holder ends the task: succeeded, failed or cancelled.
FINISH = _move("finish", LEASED, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED)
#: The lease holder's attempt failed with an error worth retrying: back to the queue; or
#: cancelled, when a cancel was asked for meanwhile (its worker was already ending it).
RETRY_LATER = _move("retry_later", LEASED, _S.QUEUED, _S.CANCELLED)
#: The lease holder shuts down and gives the task back to the queue (cancelled instead when
#: a cancel was asked for).
HAND_BACK = _move("hand_back", LEASED, _S.QUEUED, _S.CANCELLED)
#: The reaper takes a task whose lease expired: back to the queue, or failed with no
#: attempts left, or cancelled when a cancel was asked for.
LEASE_EXPIRED = _move("lease_expired", LEASED, _S.QUEUED, _S.FAILED, _S.CANCELLED)
#: A person cancels: at once where no worker holds the task (a held one is flagged for its
#: worker, whose FINISH then cancels it).
CANCEL = _move("cancel", may_become(_S.CANCELLED) - LEASED, _S.CANCELLED)
#: A person retries a finished task: queued again (a held one is the worker's to requeue).
RETRY = _move("retry", may_become(_S.QUEUED) - LEASED, _S.QUEUED)

#: Every status change the store makes.
MOVES: tuple[Move, ...] = (
    CLAIM,
    FINISH,
    RETRY_LATER,
    HAND_BACK,
    LEASE_EXPIRED,
    CANCEL,
    RETRY,
)
