"""In-process wake-ups: a task changed, so whoever watches it can look again.

The store calls :meth:`TaskSignals.publish` after every committed change that may end a task's
attempt, :meth:`TaskSignals.progressed` after one that leaves it running; requests waiting on
a task (``?wait``, event streams) re-read the database when woken. Changes by other processes
arrive through :meth:`~orchestra.db.engine.Database.watch`, which calls
:meth:`TaskSignals.remote`. It is only a hint: watchers also wake on a timer, so a change is
seen even when a notification is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class Wake(asyncio.Event):
    """A watcher's event; ``named`` says whether a change to its own task that may have ended
    it set it, rather than a change to anything (another process's commit on SQLite), for
    which a cheaper look comes first."""

    named = False

    def clear(self) -> None:
        """Unset it, and forget what set it."""
        super().clear()
        self.named = False


class TaskSignals:
    """Lets requests wait for a task to change without polling the database in a tight loop.

    Two kinds of change are published: :meth:`publish`, a change that may end a task's
    attempt (or anything, from another process), and :meth:`progressed`, one that leaves the
    task running (its claim, a step's start or end, streamed text). A wait for one task's end
    (``?wait``) sleeps through progress; the watchers of every task wake for both."""

    def __init__(self) -> None:
        self._watchers: dict[int, set[Wake]] = {}
        self._everything: set[asyncio.Event] = set()
        #: The service is stopping: waits end now, with the task as it is (:meth:`stop`).
        self.stopping = False

    def stop(self) -> None:
        """The service is stopping: wake every watcher, and let waits for a task's end
        answer with the task as it is, at once, rather than be cut off at the end of the
        HTTP drain (their clients wait again, on another process)."""
        self.stopping = True
        self.remote(None)

    @contextmanager
    def watch(self, task_id: int) -> Iterator[Wake]:
        """An event set when a change that may end ``task_id``'s attempt is published (not
        by its progress), or any change (``named`` then False). Enter it *before* reading
        the task, so a change between the read and the wait is not missed; clear it after
        each wake-up."""
        event = Wake()
        self._watchers.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(task_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[task_id]

    @contextmanager
    def watch_all(self) -> Iterator[asyncio.Event]:
        """An event set when any task changes, progress included (the event feed, the
        dashboard's live views), or the service stops (set at once when it is stopping
        already); clear it after each wake-up."""
        event = asyncio.Event()
        if self.stopping:
            event.set()
        self._everything.add(event)
        try:
            yield event
        finally:
            self._everything.discard(event)

    def publish(self, task_ids: Iterable[int]) -> None:
        """Wake everyone watching these tasks (cheap when nobody watches): they changed in a
        way that may end their attempts (``named`` set: the whole task is worth reading).
        No task wakes nobody: an idle worker's claim or an empty reap changed nothing."""
        task_ids = list(task_ids)
        if not task_ids:
            return
        for event in self._everything:
            event.set()
        for task_id in task_ids:
            for event in self._watchers.get(task_id, ()):
                event.named = True
                event.set()

    def remote(self, task_ids: Iterable[int] | None, progress: bool = False) -> None:
        """Another process changed these tasks: as :meth:`progressed` when the change leaves
        them running (``progress``), else as :meth:`publish`. None (which tasks is not known:
        SQLite's notice of another process's commit, or a listener that reconnected) wakes
        every watcher for a cheaper look first (``named`` stays False)."""
        if task_ids is not None:
            (self.progressed if progress else self.publish)(task_ids)
            return
        for event in self._everything:
            event.set()
        for events in self._watchers.values():
            for event in events:
                event.set()

    def progressed(self, task_ids: Iterable[int]) -> None:
        """Wake the watchers of every task: these tasks changed and are still running (none:
        nothing to wake them for)."""
        if not any(True for _ in task_ids):  # no watcher of one task waits for progress
            return
        for event in self._everything:
            event.set()
