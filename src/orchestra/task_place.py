"""Where a follow of one task's events is, and how new events carry it on (no holes, up to
``task.finished``): shared by the follow's own task and the feed's reader
(:meth:`orchestra.tasks.TaskService.follow_batches`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from orchestra.db.events import TERMINAL_EVENT, TaskEvent
from orchestra.db.feed import FeedEvent


def finishes(events: Iterable[FeedEvent]) -> bool:
    """Whether a task's ``task.finished`` is among ``events``."""
    return any(e.type == TERMINAL_EVENT for e in events)


def in_sequence(live: list[TaskEvent], last: int) -> tuple[list[TaskEvent], int | None, bool]:
    """Of a task's new events (all past ``last``), those that follow on from ``last`` without
    a hole, up to ``task.finished``; the number of the first one past a hole (None: no hole);
    and whether ``task.finished`` was among them."""
    for i, event in enumerate(live):
        if event.seq != last + 1 + i:
            return live[:i], event.seq, False
        if event.type == TERMINAL_EVENT:
            return live[: i + 1], None, True
    return live, None, False


class TaskPlace:
    """Where one follow of a task is: the last sequence number given, by its own task or by
    the feed's reader through ``write``, and whether ``task.finished`` was."""

    __slots__ = ("ended", "last", "wake", "write")

    def __init__(self, last: int, write: Callable[[list[TaskEvent]], bool] | None) -> None:
        self.last, self.write, self.ended = last, write, False
        self.wake: Callable[[], None] = lambda: None

    def deliver(self, events: list[FeedEvent]) -> bool:
        """:data:`~orchestra.feed.Deliver` for the follow: the events past its place, written
        if they follow on without a hole (else its task reads the database); after
        ``task.finished``, its task is woken to end the stream."""
        if self.ended:
            return True
        live = [e.as_task_event() for e in events if e.seq > self.last]
        if not live:  # a task.finished short of the place: its task sees whether it ended
            return not finishes(events)
        live, hole, ended = in_sequence(live, self.last)
        assert self.write is not None
        if hole is not None or not self.write(live):
            return False
        self.last = live[-1].seq
        if ended:
            self.ended = True
            self.wake()
        return True
