"""The worker pool: claim -> run -> finish, with a lease keeper, a reaper and a graceful stop.

One dispatcher coroutine claims as many due tasks as there are free slots (and free per-model
capacity) in one statement and starts a named asyncio task for each. It wakes the moment a task
is submitted in this process (:meth:`WorkerPool.notify`), a slot frees up, or a delayed task or
retry becomes due (:meth:`WorkerPool.wake_at`), and polls as a fallback for work enqueued by
other processes.

Side loops renew the leases of running tasks every ``lease_seconds / 3`` (and learn of cancel
requests), return the tasks of dead workers to the queue, and delete old finished tasks. They
log failures and carry on.

Shutdown: stop claiming, give running tasks ``shutdown_grace`` seconds, then cancel the rest and
hand them back (queued again, the attempt not counted against ``max_attempts``).
"""

from __future__ import annotations

import asyncio
import heapq
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

from orchestra import logs
from orchestra.config import Settings
from orchestra.db import Lease, TaskStore
from orchestra.domain import RetryPolicy, Step, Task, TaskError, TaskStatus, now
from orchestra.errors import LeaseLost, TemplateNotFound
from orchestra.runner import Runner, StepFailed
from orchestra.templating.registry import TemplateRegistry

log = logs.get("orchestra.worker")

RETENTION_BATCH = 500
TEXT_FLUSH_SECONDS = 0.05
_CANCELLED = TaskError(type="cancelled", message="cancelled by request")


def worker_id() -> str:
    """A name for this process's pool that is unique across restarts: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _LeasedRecorder:
    """Records steps through the store, fenced by the task's lease.

    Streamed text is buffered and written as one ``step.tokens`` event at most every
    ``TEXT_FLUSH_SECONDS``, so the database is not written per token. The lock keeps the events
    in order: a step's last text is written before its ``step.finished``.
    """

    def __init__(self, store: TaskStore, lease: Lease) -> None:
        self.store = store
        self.lease = lease
        self._text: dict[str, list[str]] = {}
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def step_started(self, step_id: str, position: int) -> None:
        if not await self.store.start_step(self.lease, step_id, position):
            raise LeaseLost()

    async def step_finished(self, step: Step) -> None:
        async with self._lock:
            # The step's last text goes in the same transaction as its end.
            text = await self._write_text(keep=step.id)
            if not await self.store.finish_step(self.lease, step, text):
                raise LeaseLost()

    def step_text(self, step_id: str, text: str) -> None:
        self._text.setdefault(step_id, []).append(text)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(TEXT_FLUSH_SECONDS)
        try:
            await self._flush()
        except Exception:  # the step's own writes notice a lost lease or a failing database
            log.warning("task.text_not_recorded", task_id=self.lease.task_id)

    async def _flush(self) -> None:
        async with self._lock:
            self._timer = None
            await self._write_text()

    async def _write_text(self, keep: str | None = None) -> str:
        """Write the buffered text (the lock held) except ``keep``'s, which is returned."""
        pending, self._text = self._text, {}
        kept = "".join(pending.pop(keep, [])) if keep else ""
        for step_id, parts in pending.items():
            await self.store.add_text(self.lease, step_id, "".join(parts))
        return kept


class WorkerPool:
    """Runs queued tasks in this process, ``[workers] concurrency`` at a time."""

    def __init__(
        self,
        store: TaskStore,
        registry: TemplateRegistry,
        runner: Runner,
        settings: Settings,
    ) -> None:
        self.store = store
        self.registry = registry
        self.runner = runner
        self.settings = settings
        self.workers = settings.workers
        self.owner = worker_id()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._models: Counter[str | None] = Counter()
        self._finishing: set[int] = set()
        self._lost: set[int] = set()
        self._cancelling: set[int] = set()
        self._due: list[float] = []  # loop times when delayed tasks or retries become due
        self._loops: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """How many tasks run right now."""
        return len(self._running)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Return dead workers' tasks to the queue, then start claiming."""
        await self._reap()
        loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [
            ("dispatcher", self._dispatch),
            ("lease-keeper", self._keep_leases),
            ("reaper", self._reap_forever),
        ]
        if self.settings.retention.days > 0:
            loops.append(("retention", self._retention_forever))
        for name, loop in loops:
            self._loops.add(asyncio.create_task(loop(), name=f"orchestra-{name}"))
        log.info("pool.started", owner=self.owner, concurrency=self.workers.concurrency)

    def notify(self) -> None:
        """Work may be due: claim now instead of at the next poll."""
        self._wake.set()

    def wake_at(self, when: datetime) -> None:
        """A task becomes due at ``when`` (a delayed submit or a retry): claim it then."""
        loop = asyncio.get_running_loop()
        # A few milliseconds late, so the claim's clock agrees that the task is due.
        delay = (when - now()).total_seconds() + 0.005
        heapq.heappush(self._due, loop.time() + max(delay, 0.0))
        self._wake.set()

    def cancel(self, task_id: int) -> bool:
        """Cancel a task running in this process; False when it does not run here."""
        runner = self._running.get(task_id)
        if runner is None or task_id in self._finishing:
            return False
        self._cancelling.add(task_id)
        runner.cancel()
        return True

    def request_stop(self) -> None:
        """Stop claiming new tasks (safe to call from a signal handler via the loop)."""
        self._stopping.set()
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, let running tasks finish within the grace period, hand back the rest."""
        self.request_stop()
        running = list(self._running.values())
        if running:
            log.info("pool.draining", tasks=len(running), grace_s=self.workers.shutdown_grace)
            _, pending = await asyncio.wait(running, timeout=self.workers.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        log.info("pool.stopped", owner=self.owner)

    # -- claiming -----------------------------------------------------------------------------

    def _capacity(self) -> tuple[int, set[str]]:
        """How many tasks one claim may take, and the models that are at their limit.

        A batch could be all one model, so it is never larger than the smallest remaining
        capacity among limited models; a model with none left is skipped by the claim.
        """
        limit = self.workers.concurrency - len(self._running)
        full: set[str] = set()
        for model in set(self.settings.models) | {m for m in self._models if m is not None}:
            cap = self.settings.model_limit(model)
            if cap:
                remaining = cap - self._models[model]
                if remaining <= 0:
                    full.add(model)
                else:
                    limit = min(limit, remaining)
        return limit, full

    def _wait_seconds(self) -> float:
        """Until the next delayed task is due, or the poll interval, whichever is sooner."""
        loop_now = asyncio.get_running_loop().time()
        due_now = False
        while self._due and self._due[0] <= loop_now:
            heapq.heappop(self._due)
            due_now = True
        if due_now:
            return 0.0
        if self._due:
            return min(self.workers.poll_interval, self._due[0] - loop_now)
        return self.workers.poll_interval

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            # Clear first, every round: a submit or a finished task after this point sets it
            # again, so no wake-up is lost; and an event left set while every slot is busy
            # would make wait() return at once and spin without ever yielding the loop.
            self._wake.clear()
            limit, full = self._capacity()
            if limit > 0:
                try:
                    claimed = await self.store.claim(
                        self.owner, limit, self.workers.lease_seconds, skip_models=full
                    )
                except Exception:
                    log.exception("pool.claim_failed")
                    claimed = []
                for task in claimed:
                    self._spawn(task)
                if claimed and len(claimed) == limit:
                    continue  # there may be more due work
            wait = self._wait_seconds()
            if wait <= 0:
                continue
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _spawn(self, task: Task) -> None:
        self._models[task.model] += 1
        runner = asyncio.create_task(self._run(task), name=f"orchestra-task-{task.id}")
        self._running[task.id] = runner

    # -- running one task ---------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        lease = Lease(task_id=task.id, owner=self.owner, attempt=task.attempts)
        tlog = log.bind(task_id=task.id, template=task.template, attempt=task.attempts)
        clock = time.perf_counter()
        tlog.info("task.started")
        try:
            status, result, error, policy = await self._execute(task, lease, tlog)
            self._finishing.add(task.id)
            if error is not None and error.retryable and task.counted_attempts < task.max_attempts:
                await self._retry_later(task, lease, error, policy, tlog)
            elif await self.store.finish(lease, status, result=result, error=error):
                tlog.info(
                    "task.finished",
                    status=status.value,
                    duration_ms=round((time.perf_counter() - clock) * 1000, 1),
                    error=error.message if error else None,
                )
            else:
                tlog.warning("task.lease_lost", detail="finished, but another attempt owns it")
        except LeaseLost:
            tlog.warning("task.lease_lost", detail="stopped: another attempt owns the task")
        except asyncio.CancelledError:
            if task.id in self._cancelling:
                await self._finish_cancelled(lease, tlog)
                return
            if task.id in self._lost:
                tlog.warning("task.lease_lost", detail="cancelled: the lease could not be renewed")
                return
            await self._hand_back(lease, tlog)
            raise
        except Exception:
            # The database failed us mid-task. The lease is no longer renewed, so the task
            # returns to the queue when it expires and runs again: nothing is lost.
            tlog.exception("task.store_failed")
        finally:
            self._running.pop(task.id, None)
            self._models[task.model] -= 1
            if self._models[task.model] <= 0:
                del self._models[task.model]
            for marks in (self._finishing, self._lost, self._cancelling):
                marks.discard(task.id)
            self._wake.set()

    async def _execute(
        self, task: Task, lease: Lease, tlog: Any
    ) -> tuple[TaskStatus, Any, TaskError | None, RetryPolicy]:
        default = RetryPolicy(max_attempts=self.workers.max_attempts)
        try:
            template = self.registry.for_task(task.template, task.template_version)
        except TemplateNotFound as exc:
            error = TaskError(type=exc.code, message=exc.message)
            return TaskStatus.FAILED, None, error, default
        policy = template.retry or default
        timeout = task.timeout_seconds if task.timeout_seconds is not None else template.timeout
        try:
            # Leaving the timeout cancels whatever runs, including the model call.
            async with asyncio.timeout(timeout):
                result = await self.runner.run(task, template, _LeasedRecorder(self.store, lease))
        except TimeoutError:
            error = TaskError(
                type="timeout",
                message=f"the task took longer than its timeout of {timeout:g}s",
                retryable=True,
            )
            return TaskStatus.FAILED, None, error, policy
        except StepFailed as exc:
            return TaskStatus.FAILED, None, exc.as_task_error(), policy
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: record it on the task rather than lose the task
            tlog.exception("task.crashed")
            error = TaskError(type="internal", message=f"{type(exc).__name__}: {exc}")
            return TaskStatus.FAILED, None, error, policy
        return TaskStatus.SUCCEEDED, result, None, policy

    async def _retry_later(
        self, task: Task, lease: Lease, error: TaskError, policy: RetryPolicy, tlog: Any
    ) -> None:
        delay = policy.delay(task.counted_attempts)
        run_at = now() + timedelta(seconds=delay)
        if await self.store.retry_later(lease, error, run_at):
            tlog.warning(
                "task.retrying",
                error=error.message,
                delay_s=round(delay, 3),
                attempts_left=task.max_attempts - task.counted_attempts,
            )
            self.wake_at(run_at)
        else:
            tlog.warning("task.lease_lost", detail="failed, but another attempt owns it")

    async def _finish_cancelled(self, lease: Lease, tlog: Any) -> None:
        try:
            done = await self.store.finish(lease, TaskStatus.CANCELLED, error=_CANCELLED)
        except Exception:
            tlog.exception("task.store_failed")
            return
        if done:
            tlog.info("task.finished", status=TaskStatus.CANCELLED.value)

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
        self,
        seconds: float,
        name: str,
        body: Callable[[], Awaitable[object]],
        first: float | None = None,
    ) -> None:
        await asyncio.sleep(seconds if first is None else first)
        while True:
            try:
                await body()
            except Exception:
                log.exception("pool.side_loop_failed", loop=name)
            await asyncio.sleep(seconds)

    async def _keep_leases(self) -> None:
        await self._every(self.workers.lease_seconds / 3, "lease_renewal", self._renew)

    async def _renew(self) -> None:
        ids = [i for i in self._running if i not in self._finishing]
        if not ids:
            return
        renewal = await self.store.renew_leases(self.owner, ids, self.workers.lease_seconds)
        for task_id in set(ids) - renewal.held:
            runner = self._running.get(task_id)
            if runner is not None and task_id not in self._finishing:
                self._lost.add(task_id)
                runner.cancel()
        for task_id in renewal.cancel_requested:
            self.cancel(task_id)  # asked for by another process

    async def _reap_forever(self) -> None:
        await self._every(self.workers.reap_interval, "reap", self._reap)

    async def _reap(self) -> None:
        moved = await self.store.requeue_expired()
        for task_id, status in moved.items():
            log.warning("task.lease_expired", task_id=task_id, now=status.value)
        if any(s is TaskStatus.QUEUED for s in moved.values()):
            self._wake.set()

    async def _retention_forever(self) -> None:
        # Soon after start too: a service restarted more often than `interval` still prunes.
        interval = self.settings.retention.interval
        await self._every(interval, "retention", self.apply_retention, first=min(interval, 60.0))

    async def apply_retention(self) -> int:
        """Delete finished tasks older than ``[retention] days``, a small batch at a time."""
        cutoff = now() - timedelta(days=self.settings.retention.days)
        total = 0
        while True:
            deleted = await self.store.delete_finished_before(cutoff, RETENTION_BATCH)
            total += deleted
            if deleted < RETENTION_BATCH:
                break
            await asyncio.sleep(0)  # let claims and submits in between batches
        if total:
            log.info("retention.deleted", tasks=total, cutoff=cutoff.isoformat())
        return total
