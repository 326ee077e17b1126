"""Service functions for tasks: submit, read, wait, list. Controllers call only these."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from orchestra.db.store import TaskPage, TaskStore
from orchestra.domain import NewTask, Task, TaskStatus
from orchestra.errors import TaskNotFound
from orchestra.notify import FinishedWaiters
from orchestra.templating.params import validate_params
from orchestra.templating.registry import TemplateRegistry

#: Ids are SQLite INTEGERs (64-bit signed); larger numbers cannot name a task.
MAX_ID = 2**63 - 1

#: Waiting requests re-read the task at least this often, to see work finished elsewhere.
WAIT_POLL_SECONDS = 1.0


class TaskService:
    """What the API can do with tasks."""

    def __init__(
        self,
        store: TaskStore,
        registry: TemplateRegistry,
        waiters: FinishedWaiters,
        *,
        wake_workers: Callable[[], None],
        max_attempts: int,
    ) -> None:
        self.store = store
        self.registry = registry
        self.waiters = waiters
        self.wake_workers = wake_workers
        self.max_attempts = max_attempts

    async def submit(
        self,
        template: str,
        params: dict[str, Any],
        *,
        priority: int = 0,
        model: str | None = None,
    ) -> Task:
        """Validate a task against its template and queue it.

        Raises:
            TemplateNotFound: no such template.
            InvalidParams: the parameters do not fit (every problem listed).
        """
        spec = self.registry.get(template)
        full = validate_params(spec, params)
        task = await self.store.enqueue(
            NewTask(
                template=spec.name,
                template_version=spec.version,
                params=full,
                model=model,
                priority=priority,
                max_attempts=self.max_attempts,
            )
        )
        self.wake_workers()
        return task

    async def get(self, task_id: int, *, wait: float = 0.0) -> Task:
        """A task; with ``wait`` > 0, answer as soon as it is finished or after ``wait`` seconds.

        Raises:
            TaskNotFound: no task has this id.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self.waiters.watch(task_id) as finished:
            task = await self._get(task_id)
            while not task.finished and (remaining := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(remaining, WAIT_POLL_SECONDS)):
                        await finished.wait()
                except TimeoutError:
                    pass
                finished.clear()
                task = await self._get(task_id)
        return task

    async def _get(self, task_id: int) -> Task:
        task = await self.store.get_task(task_id) if 0 < task_id <= MAX_ID else None
        if task is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return task

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        template: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first."""
        return await self.store.list_page(
            status=status, template=template, limit=limit, before=before
        )
