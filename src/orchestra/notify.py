"""In-process wake-ups: a task finished, so whoever waits on it can look again.

Only a hint: waiters always re-read the database and also wake on a timer, so a task finished
by another process is still seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class FinishedWaiters:
    """Lets requests wait for a task to finish without polling the database in a tight loop."""

    def __init__(self) -> None:
        self._watchers: dict[int, set[asyncio.Event]] = {}

    @contextmanager
    def watch(self, task_id: int) -> Iterator[asyncio.Event]:
        """An event set when ``task_id`` finishes. Enter it *before* reading the task, so a
        finish between the read and the wait is not missed."""
        event = asyncio.Event()
        self._watchers.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(task_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[task_id]

    def publish(self, task_id: int) -> None:
        """Wake everyone watching ``task_id`` (a no-op when nobody watches)."""
        for event in self._watchers.get(task_id, ()):
            event.set()
