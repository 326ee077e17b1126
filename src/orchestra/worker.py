"""The worker pool: claim -> run -> finish, with a lease keeper, a reaper and a graceful stop.

One dispatcher coroutine claims as many due tasks as there are free slots (and free per-model
capacity, and none of the slot kept from batch rows: :mod:`orchestra.capacity`) in one
statement and starts a named asyncio task for each. It wakes the moment a task is submitted in
this process (:meth:`WorkerPool.notify`), a slot frees up while its last claim left due work
queued, or a delayed task or retry becomes due (:meth:`WorkerPool.wake_at`), and polls as a
fallback for work enqueued by other processes.

A task's writes are few: the claim also starts its first step, and the step that ends its
attempt (the last, or one that failed) is written with the task's end, in one transaction;
other steps' starts and ends are written as they happen. Each is fenced by the task's lease.

Side loops renew the leases of running tasks every ``lease_seconds / 3`` (and learn of cancel
requests), return the tasks of dead workers to the queue, and delete old finished tasks. They
log failures and carry on.

While the database refuses writes (a full disk, a lock held elsewhere), the dispatcher backs
off, and a running task's writes are tried again until its lease runs out (past it, it stops
and the reaper queues it again). Claims failing otherwise show in /health (:mod:`pool_health`).

Shutdown: stop claiming, give running tasks ``shutdown_grace`` seconds, then cancel the rest and
hand them back (queued again, the attempt not counted against ``max_attempts``).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from orchestra import logs, metrics, upkeep
from orchestra.capacity import Capacity
from orchestra.claim_failures import ClaimFailures
from orchestra.config import Settings
from orchestra.db import TaskStore
from orchestra.domain import (
    NewTask,
    Retry,
    RetryPolicy,
    Task,
    TaskError,
    TaskStatus,
    decide_retry,
    now,
)
from orchestra.errors import LeaseLost, StorageError, TemplateNotFound
from orchestra.owners import worker_id
from orchestra.pool_health import PoolHealth
from orchestra.runner import Runner, StepFailed
from orchestra.running import (
    LeasedRecorder,
    Running,
    StopReason,
    Writer,
    count_cancelled,
    finish_cancelled,
    hand_back,
    renew_leases,
    within_lease,
)
from orchestra.sizes import clip_message
from orchestra.templating.model import Template
from orchestra.templating.registry import TemplateRegistry

log = logs.get("orchestra.worker")

#: Longest pause before a failed dispatcher is started again, seconds.
DISPATCHER_RESTART_CAP = 10.0

T = TypeVar("T")


class WorkerPool:
    """Runs queued tasks in this process, ``[workers] concurrency`` at a time."""

    def __init__(
        self,
        store: TaskStore,
        registry: TemplateRegistry,
        runner: Runner,
        settings: Settings,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        #: Learns templates other processes registered (TemplateCatalog.refresh).
        self._refresh = refresh
        self.runner = runner
        self.settings = settings
        self.workers = settings.workers
        self.owner = worker_id()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        #: A second stop signal: the grace ends now (:meth:`hurry`).
        self._hurried = asyncio.Event()
        #: The look for cancels other processes asked for (:meth:`others_changed`).
        self._cancel_look: asyncio.Task[None] | None = None
        self._look_again = False
        #: The tasks running here, by id: the one record of each (see :class:`Running`).
        self._running: dict[int, Running] = {}
        #: The slots, the reserve kept from batch rows, and the models' own limits.
        self.capacity = Capacity(
            self.workers.concurrency,
            {model: cap for model in settings.models if (cap := settings.model_limit(model))},
        )
        self._due: list[float] = []  # loop times when delayed tasks or retries become due
        #: The dispatcher's sleep between claims while it sleeps (None while it claims).
        self._sleep: asyncio.Timeout | None = None
        self._loops: set[asyncio.Task[None]] = set()
        #: The loop that claims (one of ``_loops``); a stop lets its claim in flight end.
        self._dispatcher: asyncio.Task[None] | None = None
        self._dispatcher_started = 0.0
        self._dispatcher_failures = 0
        #: Claims the database refused in a row (it backs off meanwhile).
        self._refused = ClaimFailures(log, self.workers.poll_interval)
        self.health = PoolHealth()  #: whether claims succeed, for /health
        #: The last claim took every due task it could see, with room to spare: a task that
        #: ends then frees a slot with nothing to fill it, and does not wake the dispatcher
        #: for an empty claim (a submit, a due retry or the poll does).
        self._drained = False

    @property
    def running(self) -> int:
        """How many tasks run right now."""
        return len(self._running)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Return dead workers' tasks to the queue (those of a process on this machine known
        dead at once, :mod:`orchestra.owners`), then start claiming."""
        await upkeep.rescue_dead_here(self.store, self.owner, self._wake.set)  # logs failures
        try:
            await self._reap()
        except StorageError as exc:  # the reaper's loop tries again
            log.warning("pool.reap_failed", error=exc.message)
        self._start_dispatcher()
        loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [
            ("lease-keeper", self._keep_leases),
            ("reaper", self._reap_forever),
        ]
        if self.settings.retention.days > 0:
            loops.append(("retention", self._retention_forever))
        for name, loop in loops:
            self._loops.add(asyncio.create_task(loop(), name=f"orchestra-{name}"))
        metrics.worker_slots(self.workers.concurrency)
        log.info("pool.started", owner=self.owner, concurrency=self.workers.concurrency)

    def _start_dispatcher(self) -> None:
        if self._stopping.is_set():
            return
        self._dispatcher = asyncio.create_task(self._dispatch(), name="orchestra-dispatcher")
        self._dispatcher_started = asyncio.get_running_loop().time()
        self._loops.add(self._dispatcher)
        self._dispatcher.add_done_callback(self._dispatcher_ended)

    def _dispatcher_ended(self, ended: asyncio.Task[None]) -> None:
        """A dispatcher that ended on an error (a bug) is logged and started again, after a
        pause that doubles while it keeps failing at once (0.1 s up to 10 s): without it the
        process claims nothing. /health says so until a claim succeeds."""
        self._loops.discard(ended)
        error = None if ended.cancelled() else ended.exception()
        if error is None or self._stopping.is_set():
            return
        loop = asyncio.get_running_loop()
        quick = loop.time() - self._dispatcher_started < DISPATCHER_RESTART_CAP
        self._dispatcher_failures = self._dispatcher_failures + 1 if quick else 1
        pause = min(0.1 * 2 ** (self._dispatcher_failures - 1), DISPATCHER_RESTART_CAP)
        log.error(
            "pool.dispatcher_failed", error=f"{type(error).__name__}: {error}", restart_in_s=pause
        )
        self.health.failed("the claiming loop failed", error)
        loop.call_later(pause, self._start_dispatcher)

    def notify(self) -> None:
        """Work may be due: claim now instead of at the next poll."""
        self._wake.set()

    def wake_at(self, when: datetime) -> None:
        """A task becomes due at ``when`` (a delayed submit or a retry): claim it then."""
        if not self._loops:  # not started (--no-workers): other processes' workers claim it
            return
        loop = asyncio.get_running_loop()
        # A few milliseconds late, so the claim's clock agrees that the task is due.
        delay = (when - now()).total_seconds() + 0.005
        at = loop.time() + max(delay, 0.0)
        heapq.heappush(self._due, at)
        # No claim now (nothing is due yet): a dispatcher asleep past ``at`` wakes at ``at``
        # instead; one that is claiming reads the new time from the heap when it is done.
        sleep = self._sleep
        if sleep is not None:
            deadline = sleep.when()
            if deadline is None or at < deadline:
                sleep.reschedule(at)

    def takes(self, new: NewTask) -> bool:
        """Whether this pool's next claim would take ``new`` (due now): it claims, and has a
        slot free for its model and priority."""
        if not self._loops or self._stopping.is_set() or self._refused.count:
            return False
        plan = self.capacity.next_claim(r.task for r in self._running.values())
        fits = plan.min_priority is None or new.priority >= plan.min_priority
        return plan.limit > 0 and new.model not in plan.skip_models and fits

    def cancel(self, task_id: int) -> bool:
        """Cancel a task running in this process; False when it does not run here."""
        running = self._running.get(task_id)
        if running is None or running.finishing:
            return False
        running.interrupt(StopReason.CANCELLED)
        return True

    def others_changed(self, task_ids: Collection[int] | None) -> None:
        """Another process changed these tasks (None: some tasks; SQLite's notice of its
        commit). When one may be running here, look at once whether a cancel was asked for:
        a cancel sent to another process then stops the task within moments, not at the next
        lease renewal (``lease_seconds / 3``)."""
        if not self._running:
            return
        if task_ids is not None and not any(i in self._running for i in task_ids):
            return
        self._look_again = True
        if self._cancel_look is None or self._cancel_look.done():
            self._cancel_look = asyncio.create_task(self._look_for_cancels(), name="cancel-look")

    async def _look_for_cancels(self) -> None:
        """Read the cancel flags of the tasks running here, again as long as more changes
        came meanwhile (one read at a time)."""
        while self._look_again:
            self._look_again = False
            ids = [i for i, r in self._running.items() if not r.finishing]
            try:
                asked = await self.store.cancels_requested(ids)
            except StorageError:
                return  # the lease renewal looks too
            for task_id in asked:
                self.cancel(task_id)

    def request_stop(self) -> None:
        """Stop claiming new tasks (safe to call from a signal handler via the loop)."""
        self._stopping.set()
        self._wake.set()

    def hurry(self) -> None:
        """Stop claiming, and end the grace of a stop now: the tasks still running are handed
        back at once (a second Ctrl-C)."""
        self.request_stop()
        self._hurried.set()

    async def stop(self) -> None:
        """Stop claiming, let running tasks finish within the grace period (or until
        :meth:`hurry`), hand back the rest."""
        self.request_stop()
        grace = self.workers.shutdown_grace
        deadline = asyncio.get_running_loop().time() + grace
        # A claim in flight ends first (cancelled, it may still commit, and what it took
        # would stay claimed until its leases ran out), its tasks then run or are handed back
        # with the rest; not bounded by the grace, but by a lease (then the reaper takes over).
        if self._dispatcher is not None:
            await asyncio.wait([self._dispatcher], timeout=max(grace, self.workers.lease_seconds))
        running = [r.runner for r in self._running.values() if r.runner is not None]
        if running:
            log.info("pool.draining", tasks=len(running), grace_s=grace)
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            finished: asyncio.Future[Any] = asyncio.gather(*running, return_exceptions=True)
            hurried: asyncio.Future[Any] = asyncio.ensure_future(self._hurried.wait())
            await asyncio.wait(
                [finished, hurried], timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            hurried.cancel()
            pending = [task for task in running if not task.done()]
            for task in pending:
                task.cancel()
            await finished
        looks = [self._cancel_look] if self._cancel_look is not None else []
        for loop in [*self._loops, *looks]:
            loop.cancel()
        await asyncio.gather(*self._loops, *looks, return_exceptions=True)
        self._cancel_look = None
        self._loops.clear()
        self._dispatcher = None
        metrics.worker_slots(-self.workers.concurrency)
        log.info("pool.stopped", owner=self.owner)

    # -- claiming -----------------------------------------------------------------------------

    def _wait_seconds(self, claimed_at: float | None) -> float:
        """Until the next delayed task is due, or the poll interval, whichever is sooner; 0
        when one became due since the last claim began (at loop time ``claimed_at``; None:
        there was none). What was due when the claim began, it claimed already."""
        loop_now = asyncio.get_running_loop().time()
        due_now = False
        while self._due and self._due[0] <= loop_now:
            due = heapq.heappop(self._due)
            if claimed_at is None or due > claimed_at:
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
            plan = self.capacity.next_claim(r.task for r in self._running.values())
            limit = plan.limit
            self._drained = False
            asked: float | None = None
            if limit > 0:
                # The lease's clock starts before the claim: it may wait for the writer.
                asked = began = asyncio.get_running_loop().time()
                templates: dict[int, Template] = {}
                try:
                    claimed = await self.store.claim(
                        self.owner,
                        limit,
                        self.workers.lease_seconds,
                        skip_models=plan.skip_models,
                        first_step=functools.partial(self._first_step, templates),
                        min_priority=plan.min_priority,
                    )
                except StorageError as exc:
                    await self._back_off(exc)
                    continue
                except Exception as exc:
                    log.exception("pool.claim_failed")
                    self.health.failed("claims fail", exc)
                    claimed, asked = [], None  # what was due is still to claim
                else:
                    self.health.claimed()
                    self._refused.claimed(len(claimed))
                    # Rows left out (only the reserve was free) wait for a slot to end.
                    self._drained = (
                        len(claimed) < limit and not plan.skip_models and plan.min_priority is None
                    )
                for task in claimed:
                    self._spawn(task, began + self.workers.lease_seconds, templates.get(task.id))
                if claimed and len(claimed) == limit:
                    continue  # there may be more due work
            wait = self._wait_seconds(asked)
            if wait <= 0:
                continue
            try:
                async with asyncio.timeout(wait) as self._sleep:
                    await self._wake.wait()
            except TimeoutError:
                pass
            finally:
                self._sleep = None

    def _first_step(self, templates: dict[int, Template], task: Task) -> str | None:
        """For the claim, inside its transaction on the writer's thread: the first step of the
        task's template, which the claim starts (None when the template is gone: the run
        fails the task, naming it). The template is kept in ``templates`` for the run."""
        try:
            template = self.registry.for_task(task.template, task.template_version)
        except TemplateNotFound:
            return None
        templates[task.id] = template
        return template.steps[0].id if template.steps else None

    async def _template_for(self, task: Task) -> Template:
        """The version ``task`` was queued with; one this process has not seen was perhaps
        registered by another process on the database, so it looks there before it gives up.

        Raises:
            TemplateNotFound: that version is gone, or stored but refused by this release
                (then the database has nothing more to say: it is not read again).
        """
        try:
            return self.registry.for_task(task.template, task.template_version)
        except TemplateNotFound:
            refused = self.registry.refused(task.template, task.template_version)
            if self._refresh is None or refused is not None:
                raise
        await self._refresh()
        return self.registry.for_task(task.template, task.template_version)

    async def _back_off(self, exc: StorageError) -> None:
        """The database refused a claim: wait (longer each time in a row), not spin. A submit
        that was written (so writes work again), a task ending or a stop cuts it short."""
        pause = self._refused.failed(exc)
        try:
            async with asyncio.timeout(pause):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _spawn(self, task: Task, lease_until: float, template: Template | None) -> None:
        stale = self._running.get(task.id)
        if stale is not None:
            # Its earlier attempt still runs here, past a lease that expired while the
            # database refused writes; the reaper gave the task back and this pool took it
            # again. The old attempt's writes are fenced off; stop it too. It no longer
            # counts against the capacity: only the record of the newer attempt is kept.
            stale.interrupt(StopReason.LEASE_LOST)
        try:
            running = self._running[task.id] = Running(task, self.owner, lease_until, template)
            name = f"orchestra-task-{task.id}"
            running.runner = asyncio.create_task(self._run(running), name=name)
        except Exception:  # a bug: the pool goes on; the task runs again when its lease expires
            self._running.pop(task.id, None)
            log.exception("pool.start_failed", task_id=task.id)

    # -- running one task ---------------------------------------------------------------------

    async def _run(self, running: Running) -> None:
        task, lease = running.task, running.lease
        tlog = log.bind(task_id=task.id, template=task.template, attempt=task.attempts)
        logs.bind_task(task.id, task.template, task.attempts)  # the lines of what it calls too
        tlog.info("task.started")
        metrics.task_started(task.template, task.run_at, task.started_at)

        async def write(work: Callable[[], Awaitable[T]]) -> T:
            return await within_lease(running, work)

        try:
            running.begin()
            status, result, error, policy = await self._execute(running, write, tlog)
            running.finishing = True
            step, text = await running.ended(error)
            retry = (
                None if error is None else decide_retry(task, error, policy, at=self.store.clock())
            )
            if error is not None and retry is not None:
                await self._retry_later(running, error, retry, write, tlog)
            elif await write(
                lambda: self.store.finish(
                    lease, status, result=result, error=error, step=step, text=text
                )
            ):
                seconds = time.perf_counter() - running.clock
                metrics.task_finished(task.template, status.value, seconds)
                logs.by_outcome(tlog, status is TaskStatus.FAILED)(
                    "task.finished",
                    status=status.value,
                    duration_ms=round(seconds * 1000, 1),
                    error=error.message if error else None,
                )
            else:
                tlog.warning("task.lease_lost", detail="finished, but another attempt owns it")
        except LeaseLost:
            tlog.warning("task.lease_lost", detail="stopped: another attempt owns the task")
        except asyncio.CancelledError:
            running.finishing = True  # its end (cancelled, handed back) is written now
            if running.stop is StopReason.CANCELLED:
                await finish_cancelled(self.store, running, write, tlog)
                return
            if running.stop is StopReason.LEASE_LOST:
                tlog.warning("task.lease_lost", detail="cancelled: the lease could not be renewed")
                return
            await hand_back(self.store, running, tlog)
            raise
        except StorageError as exc:
            # The database refused the task's writes until its lease ran out. The task
            # returns to the queue when the reaper finds the lease expired, and runs again;
            # nothing half-written stays: every write is one transaction, fenced by the lease.
            tlog.warning("task.not_recorded", error=exc.message, code=exc.code)
        except Exception:
            # A bug in the storage layer: as above, the lease expires and the task runs again.
            tlog.exception("task.store_failed")
        finally:
            if running.recorder is not None:
                running.recorder.close()
            # Its recorder's writer (``write``) holds it, and its task's traceback may: break
            # the cycles, so that the attempt is freed now, not at the next full collection.
            running.recorder = running.runner = None
            metrics.slot_freed()
            if self._running.get(task.id) is running:  # not a newer attempt of the same task
                del self._running[task.id]
            if not self._drained:  # a slot is free for work the last claim left queued
                self._wake.set()

    async def _execute(
        self, running: Running, write: Writer, tlog: Any
    ) -> tuple[TaskStatus, Any, TaskError | None, RetryPolicy]:
        task = running.task
        default = RetryPolicy(max_attempts=self.workers.max_attempts)
        # Found when claimed, and then the claim started its first step.
        template = running.template
        started = template.steps[0].id if template is not None and template.steps else None
        if template is None:
            try:
                template = await self._template_for(task)
            except TemplateNotFound as exc:
                error = TaskError(type=exc.code, message=exc.message)
                return TaskStatus.FAILED, None, error, default
        policy = template.retry or default
        timeout = task.timeout_seconds if task.timeout_seconds is not None else template.timeout
        recorder = LeasedRecorder(self.store, running.lease, write, len(template.steps), started)
        running.recorder = recorder
        try:
            # Leaving the timeout cancels whatever runs, including the model call.
            async with asyncio.timeout(timeout):
                result = await self.runner.run(task, template, recorder)
        except TimeoutError:
            error = TaskError(
                type="timeout",
                message=f"the task took longer than its timeout of {timeout:g}s",
                retryable=True,
            )
            return TaskStatus.FAILED, None, error, policy
        except StepFailed as exc:
            return TaskStatus.FAILED, None, exc.as_task_error(), policy
        except (LeaseLost, StorageError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: record it on the task rather than lose the task
            tlog.exception("task.crashed")
            error = TaskError(type="internal", message=clip_message(f"{type(exc).__name__}: {exc}"))
            return TaskStatus.FAILED, None, error, policy
        return TaskStatus.SUCCEEDED, result, None, policy

    async def _retry_later(
        self,
        running: Running,
        error: TaskError,
        retry: Retry,
        write: Writer,
        tlog: Any,
    ) -> None:
        run_at = retry.at
        step, text = await running.ended(error)
        status = await write(
            lambda: self.store.retry_later(running.lease, error, run_at, step=step, text=text)
        )
        if status is TaskStatus.CANCELLED:
            count_cancelled(running, tlog)
        elif status is not None:
            tlog.warning(
                "task.retrying",
                error=error.message,
                delay_s=round(retry.delay, 3),
                attempts_left=retry.attempts_left,
            )
            metrics.task_retried(running.task.template)
            self.wake_at(run_at)
        else:
            tlog.warning("task.lease_lost", detail="failed, but another attempt owns it")

    # -- side loops (orchestra.upkeep) -------------------------------------------------------

    async def _keep_leases(self) -> None:
        await upkeep.every(self.workers.lease_seconds / 3, "lease_renewal", self._renew)

    async def _renew(self) -> None:
        seconds = self.workers.lease_seconds
        await renew_leases(self.store, self.owner, self._running, seconds, self.cancel)

    async def _reap(self) -> None:
        await upkeep.reap(self.store, self._wake.set, list(self._running))

    async def _reap_forever(self) -> None:
        await upkeep.every(self.workers.reap_interval, "reap", self._reap)

    async def _retention_forever(self) -> None:
        # Soon after start too: a service restarted more often than `interval` still prunes.
        interval = self.settings.retention.interval
        await upkeep.every(interval, "retention", self.apply_retention, first=min(interval, 60.0))

    async def apply_retention(self) -> int:
        """Delete finished tasks older than ``[retention] days`` (see
        :func:`orchestra.upkeep.apply_retention`); returns how many tasks."""
        return await upkeep.apply_retention(self.store, self.settings.retention)
