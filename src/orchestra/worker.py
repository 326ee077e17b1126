"""The worker pool: claim -> run -> finish, with a lease keeper, a reaper and a graceful stop.

One dispatcher coroutine claims as many due tasks as there are free slots in one statement and
starts a named asyncio task for each. It wakes the moment a task is submitted in this process
(:meth:`WorkerPool.notify`) or a slot frees up, and polls as a fallback for work enqueued
elsewhere. Side loops renew the leases of running tasks every ``lease_seconds / 3`` and return
the tasks of dead workers to the queue; they log failures and carry on.

Shutdown: stop claiming, give running tasks ``shutdown_grace`` seconds, then cancel the rest and
hand their leases back (queued again, the attempt not counted).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from orchestra import logs
from orchestra.config import WorkerSettings
from orchestra.db.store import Lease, TaskStore
from orchestra.domain import Step, Task, TaskError, TaskStatus
from orchestra.errors import LeaseLost, TemplateNotFound
from orchestra.runner import Runner, StepFailed
from orchestra.templating.registry import TemplateRegistry

log = logs.get("orchestra.worker")


def worker_id() -> str:
    """A name for this process's pool that is unique across restarts: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _LeasedRecorder:
    """Records steps through the store, fenced by the task's lease."""

    def __init__(self, store: TaskStore, lease: Lease) -> None:
        self.store = store
        self.lease = lease

    async def step_started(self, step_id: str, position: int) -> None:
        if not await self.store.start_step(self.lease, step_id, position):
            raise LeaseLost()

    async def step_finished(self, step: Step) -> None:
        if not await self.store.finish_step(self.lease, step):
            raise LeaseLost()


class WorkerPool:
    """Runs queued tasks in this process, ``settings.concurrency`` at a time."""

    def __init__(
        self,
        store: TaskStore,
        registry: TemplateRegistry,
        runner: Runner,
        settings: WorkerSettings,
        *,
        on_finished: Callable[[int], None] = lambda _id: None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.runner = runner
        self.settings = settings
        self.on_finished = on_finished
        self.owner = worker_id()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._finishing: set[int] = set()
        self._lost: set[int] = set()
        self._loops: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """How many tasks run right now."""
        return len(self._running)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Return dead workers' tasks to the queue, then start claiming."""
        await self._reap()
        for name, loop in (
            ("dispatcher", self._dispatch),
            ("lease-keeper", self._keep_leases),
            ("reaper", self._reap_forever),
        ):
            self._loops.add(asyncio.create_task(loop(), name=f"orchestra-{name}"))
        log.info("pool.started", owner=self.owner, concurrency=self.settings.concurrency)

    def notify(self) -> None:
        """Work may be due: claim now instead of at the next poll."""
        self._wake.set()

    def request_stop(self) -> None:
        """Stop claiming new tasks (safe to call from a signal handler via the loop)."""
        self._stopping.set()
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, let running tasks finish within the grace period, hand back the rest."""
        self.request_stop()
        running = list(self._running.values())
        if running:
            log.info("pool.draining", tasks=len(running), grace_s=self.settings.shutdown_grace)
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        log.info("pool.stopped", owner=self.owner)

    # -- claiming -----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            # Clear first, every round: a submit or a finished task after this point sets it
            # again, so no wake-up is lost; and an event left set while every slot is busy
            # would make wait() return at once and spin without ever yielding the loop.
            self._wake.clear()
            free = self.settings.concurrency - len(self._running)
            claimed: list[Task] = []
            if free > 0:
                try:
                    claimed = await self.store.claim(self.owner, free, self.settings.lease_seconds)
                except Exception:
                    log.exception("pool.claim_failed")
                for task in claimed:
                    self._spawn(task)
                if claimed and len(claimed) == free:
                    continue
            try:
                async with asyncio.timeout(self.settings.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _spawn(self, task: Task) -> None:
        runner = asyncio.create_task(self._run(task), name=f"orchestra-task-{task.id}")
        self._running[task.id] = runner

    # -- running one task ---------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        lease = Lease(task_id=task.id, owner=self.owner, attempt=task.attempts)
        tlog = log.bind(task_id=task.id, template=task.template, attempt=task.attempts)
        clock = time.perf_counter()
        tlog.info("task.started")
        try:
            status, result, error = await self._execute(task, lease, tlog)
            self._finishing.add(task.id)
            if await self.store.finish(lease, status, result=result, error=error):
                tlog.info(
                    "task.finished",
                    status=status.value,
                    duration_ms=round((time.perf_counter() - clock) * 1000, 1),
                    error=error.message if error else None,
                )
                self.on_finished(task.id)
            else:
                tlog.warning("task.lease_lost", detail="finished, but another attempt owns it")
        except LeaseLost:
            tlog.warning("task.lease_lost", detail="stopped: another attempt owns the task")
        except Exception:
            # The database failed us mid-task. The lease is no longer renewed, so the task
            # returns to the queue when it expires and runs again: nothing is lost.
            tlog.exception("task.store_failed")
        except asyncio.CancelledError:
            if task.id in self._lost:
                tlog.warning("task.lease_lost", detail="cancelled: the lease could not be renewed")
                return
            await self._hand_back(lease, tlog)
            raise
        finally:
            self._running.pop(task.id, None)
            self._finishing.discard(task.id)
            self._lost.discard(task.id)
            self._wake.set()

    async def _execute(
        self, task: Task, lease: Lease, tlog: Any
    ) -> tuple[TaskStatus, Any, TaskError | None]:
        try:
            template = self.registry.get(task.template)
        except TemplateNotFound as exc:
            return TaskStatus.FAILED, None, TaskError(type=exc.code, message=exc.message)
        if template.version != task.template_version:
            tlog.warning(
                "task.template_changed", submitted=task.template_version, running=template.version
            )
        try:
            result = await self.runner.run(task, template, _LeasedRecorder(self.store, lease))
        except StepFailed as exc:
            return TaskStatus.FAILED, None, exc.as_task_error()
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: record it on the task rather than lose the task
            tlog.exception("task.crashed")
            error = TaskError(type="internal", message=f"{type(exc).__name__}: {exc}")
            return TaskStatus.FAILED, None, error
        return TaskStatus.SUCCEEDED, result, None

    async def _hand_back(self, lease: Lease, tlog: Any) -> None:
        try:
            released = await self.store.release(lease)
        except Exception:
            tlog.exception("task.hand_back_failed")
            return
        if released:
            tlog.info("task.handed_back")

    # -- side loops ---------------------------------------------------------------------------

    async def _every(
        self, seconds: float, name: str, body: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await body()
            except Exception:
                log.exception(f"pool.{name}_failed")

    async def _keep_leases(self) -> None:
        await self._every(self.settings.lease_seconds / 3, "lease_renewal", self._renew)

    async def _renew(self) -> None:
        ids = [i for i in self._running if i not in self._finishing]
        if not ids:
            return
        held = await self.store.renew_leases(self.owner, ids, self.settings.lease_seconds)
        for task_id in set(ids) - held:
            runner = self._running.get(task_id)
            if runner is not None and task_id not in self._finishing:
                self._lost.add(task_id)
                runner.cancel()

    async def _reap_forever(self) -> None:
        await self._every(self.settings.reap_interval, "reap", self._reap)

    async def _reap(self) -> None:
        moved = await self.store.requeue_expired()
        for task_id, status in moved.items():
            log.warning("task.lease_expired", task_id=task_id, now=status.value)
            if status is TaskStatus.FAILED:
                self.on_finished(task_id)
        if any(s is TaskStatus.QUEUED for s in moved.values()):
            self._wake.set()
