"""A task running in a worker pool: its record (:class:`Running`), its steps written through
the store as they happen, fenced by its lease (:class:`LeasedRecorder`), and the renewal of
the pool's leases (:func:`renew_leases`), and the ends of an attempt its steps did not end:
cancelled, handed back."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

from orchestra import logs, metrics
from orchestra.db import TaskStore
from orchestra.domain import (
    CANCELLED_BY_REQUEST,
    Lease,
    Step,
    StepStatus,
    Task,
    TaskError,
    TaskStatus,
)
from orchestra.errors import LeaseLost, StorageError
from orchestra.templating.model import Template

log = logs.get("orchestra.worker")

#: Longest a streamed piece of text waits before it is written, seconds.
TEXT_FLUSH_SECONDS = 0.05
#: Runs a write of one task, trying it again while the database refuses and the lease lasts.
Writer = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
#: First and longest pause between tries of a task's write the database refused, seconds.
WRITE_RETRY_FIRST = 0.05
WRITE_RETRY_CAP = 1.0

T = TypeVar("T")


class LeasedRecorder:
    """Records steps through the store, fenced by the task's lease.

    Two step writes ride on others. The claim started the first step already (``started``),
    and the step that ends the attempt (the last of ``steps``, or one that failed) is held in
    :attr:`ended`, for the worker to write with the task's end in one transaction. Every other
    step's start and end is written at once, so a multi-step task is seen to progress.

    Streamed text is buffered and written as one ``step.tokens`` event at most every
    ``TEXT_FLUSH_SECONDS``, so the database is not written per token. The lock keeps the events
    in order: a step's last text is written before its ``step.finished``.
    """

    def __init__(
        self, store: TaskStore, lease: Lease, write: Writer, steps: int, started: str | None
    ) -> None:
        self.store = store
        self.lease = lease
        self._write = write
        self._last = steps - 1
        self._started = started
        #: The step that ended the attempt and its last streamed text, not written yet.
        self.ended: tuple[Step, str] | None = None
        #: That step was cut short from outside: its error is the attempt's end's.
        self.cut = False
        self._text: dict[str, list[str]] = {}
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def step_started(self, step_id: str, position: int) -> None:
        if position == 0 and step_id == self._started:
            return  # the claim started it
        if not await self._write(lambda: self.store.start_step(self.lease, step_id, position)):
            raise LeaseLost()

    async def step_finished(self, step: Step) -> None:
        async with self._lock:
            # The step's last text goes in the same transaction as its end.
            text = await self._write_text(keep=step.id)
            if step.position == self._last or step.status is StepStatus.FAILED:
                self.ended = (step, text)  # no step follows: it ends with the task
                return
            if not await self._write(lambda: self.store.finish_step(self.lease, step, text)):
                raise LeaseLost()

    def step_text(self, step_id: str, text: str) -> None:
        self._text.setdefault(step_id, []).append(text)
        if self._timer is None:
            name = f"orchestra-task-{self.lease.task_id}-text"
            self._timer = asyncio.get_running_loop().create_task(self._flush_soon(), name=name)

    def step_cut(self, step: Step) -> None:
        # No lock (it is called as the step is cancelled): a flush under way has taken its
        # text already, and the attempt's end waits for that flush (:meth:`settled`).
        self.ended = (step, "".join(self._text.pop(step.id, [])))
        self.cut = True

    async def settled(self) -> None:
        """Wait for a flush of streamed text under way: the attempt's end is written after
        it (on PostgreSQL the end could otherwise commit first, and fence the text off)."""
        async with self._lock:
            pass

    def close(self) -> None:
        """The attempt has ended: drop the text still waiting to be written (its writes,
        fenced by a lease now over, would change nothing). Its flush would otherwise come
        after a stop, as the database closes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._text = {}

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
            await self._write(
                functools.partial(self.store.add_text, self.lease, step_id, "".join(parts))
            )
        return kept


class StopReason(StrEnum):
    """Why a running task was stopped before it finished."""

    CANCELLED = "cancelled"  # by request
    LEASE_LOST = "lease_lost"  # its lease could not be renewed: another worker may have it


class Running:
    """One task running in this pool: everything the pool knows of it, in one place (its
    model's share of the capacity is counted from these)."""

    __slots__ = (
        "clock",
        "finishing",
        "lease",
        "lease_until",
        "recorder",
        "runner",
        "started",
        "stop",
        "task",
        "template",
    )

    def __init__(
        self, task: Task, owner: str, lease_until: float, template: Template | None
    ) -> None:
        self.task = task
        #: Fences every write of this attempt.
        self.lease = Lease(task_id=task.id, owner=owner, attempt=task.attempts)
        #: Loop time until which the lease is known to hold (its last renewal + lease_seconds).
        self.lease_until = lease_until
        #: The template found when it was claimed; the claim started its first step.
        self.template = template
        #: When it was claimed (``time.perf_counter``): its attempt's duration counts from here.
        self.clock = time.perf_counter()
        self.recorder: LeasedRecorder | None = None
        self.runner: asyncio.Task[None] | None = None
        #: Its runner has begun (:meth:`begin`): a coroutine cancelled before its first step
        #: never runs, its ``finally`` neither (the task stayed running, its slot taken).
        self.started = False
        #: Its end is being written: a cancel or a lost renewal no longer interrupts it.
        self.finishing = False
        self.stop: StopReason | None = None

    def interrupt(self, reason: StopReason) -> None:
        """Stop the task's coroutine; the first reason given is the one that counts. Before
        it has begun, the reason is left for it to find (:meth:`begin`). Once its end is
        being written (``finishing``), nothing cuts that write (a second cancel, seen at a
        lease renewal, cancelled the first one's write: the task was left to the reaper)."""
        if self.finishing:
            return
        self.stop = self.stop or reason
        if self.runner is not None and self.started:
            self.runner.cancel()

    def begin(self) -> None:
        """The runner's first act: from now on an interrupt cancels it.

        Raises:
            asyncio.CancelledError: it was interrupted before (a cancel, a lost lease), to
                end as a cancel would have.
        """
        self.started = True
        if self.stop is not None:
            raise asyncio.CancelledError

    async def ended(self, why: TaskError | None = None) -> tuple[Step | None, str]:
        """The step that ended the attempt and its last streamed text, still to be written
        with the task's end; (None, "") when there is none. A step cut short from outside
        gets ``why`` as its error: why the attempt ended (its timeout, a cancel, a hand-back),
        once the text it had streamed before is written."""
        if self.recorder is None or self.recorder.ended is None:
            return None, ""
        step, text = self.recorder.ended
        if self.recorder.cut:
            await self.recorder.settled()
            step = msgspec.structs.replace(step, error=why)
        return step, text


async def within_lease(running: Running, write: Callable[[], Awaitable[T]]) -> T:
    """Run one of a task's writes; while the database refuses it (a full disk, a held lock),
    try again, until the task's lease runs out.

    Raises:
        StorageError: still refused when the lease ran out.
    """
    loop = asyncio.get_running_loop()
    pause = WRITE_RETRY_FIRST
    while True:
        try:
            return await write()
        except StorageError as exc:
            if loop.time() + pause >= running.lease_until:
                raise
            if pause == WRITE_RETRY_FIRST:
                log.warning(
                    "task.write_waiting",
                    task_id=running.task.id,
                    error=exc.message,
                    lease_left_s=round(running.lease_until - loop.time(), 1),
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, WRITE_RETRY_CAP)


async def renew_leases(
    store: TaskStore,
    owner: str,
    running: dict[int, Running],
    lease_seconds: float,
    cancel: Callable[[int], object],
) -> None:
    """Renew the leases of the tasks ``running`` in pool ``owner`` (those not finishing): a
    lease held runs ``lease_seconds`` more from when it was asked for; a task whose lease was
    lost is stopped; a cancel another process asked for is passed to ``cancel``."""
    ids = [i for i, r in running.items() if not r.finishing]
    if not ids:
        return
    asked = asyncio.get_running_loop().time()
    renewal = await store.renew_leases(owner, ids, lease_seconds)
    for task_id in ids:
        record = running.get(task_id)
        if record is None:
            continue
        if task_id in renewal.held:
            record.lease_until = asked + lease_seconds
        elif not record.finishing:
            record.interrupt(StopReason.LEASE_LOST)
    for task_id in renewal.cancel_requested:
        cancel(task_id)  # asked for by another process


# -- how an attempt ends other than by its steps ---------------------------------------------

#: The error of a step cut short by a stop that handed its task back to the queue.
HANDED_BACK = TaskError(type="handed_back", message="the service stopped; the task went back")


def count_cancelled(running: Running, tlog: Any) -> None:
    """Count and log a task that ended cancelled: stopped by its cancel, or cancelled where
    its attempt's end would have queued it again (a retry, a hand-back)."""
    seconds = time.perf_counter() - running.clock
    metrics.task_finished(running.task.template, TaskStatus.CANCELLED.value, seconds)
    tlog.info("task.finished", status=TaskStatus.CANCELLED.value)


async def finish_cancelled(store: TaskStore, running: Running, write: Writer, tlog: Any) -> None:
    """Write the end of a task its cancel stopped (its step cut short says why); a refused
    write is logged, and the lease's expiry then ends it."""
    step, text = await running.ended(CANCELLED_BY_REQUEST)
    try:
        done = await write(
            lambda: store.finish(
                running.lease,
                TaskStatus.CANCELLED,
                error=CANCELLED_BY_REQUEST,
                step=step,
                text=text,
            )
        )
    except StorageError as exc:
        tlog.warning("task.not_recorded", error=exc.message, code=exc.code)
        return
    except Exception:
        tlog.exception("task.store_failed")
        return
    if done:
        count_cancelled(running, tlog)


async def hand_back(store: TaskStore, running: Running, tlog: Any) -> None:
    """Give a task the stopping pool still runs back to the queue (cancelled instead, when a
    cancel was asked for); a refused write leaves it to the reaper."""
    step, text = await running.ended(HANDED_BACK)
    try:
        released = await store.release(running.lease, step=step, text=text)
    except StorageError as exc:  # the lease expires and the reaper hands it back instead
        tlog.warning("task.hand_back_failed", error=exc.message)
        return
    except Exception:
        tlog.exception("task.hand_back_failed")
        return
    if released is TaskStatus.CANCELLED:
        count_cancelled(running, tlog)
    elif released is not None:
        tlog.info("task.handed_back")
