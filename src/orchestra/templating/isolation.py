"""Slow renders run in render processes, so that no template holds the event loop up.

A render is pure (the immutable sandbox, no I/O) and almost always quick, so ``Renderer``
first runs it on the event loop under a slice of ``INLINE_SLICE`` seconds: ordinary prompts
finish well inside it and pay nothing more. A render that outruns the slice is abandoned
(``sandbox.OutOfSlice``) and run again from the start in a render process, where the full
``render_timeout`` applies.

Why a process and not a thread: a render is pure Python and holds the GIL, while the event
loop gives the GIL up at every socket call and then waits up to the switch interval (5 ms)
to get it back. With the render on a thread, one /health request took 300 ms.

Each render process is a child (fork server, or ``spawn``) that holds the service's limits:

* it renders one thing at a time. There are ``[limits] render_processes`` of them, each
  started when first needed and then kept;
* its address space is capped at ``render_memory_mb`` (RLIMIT_AS, where the OS has it), so a
  render that allocates too much fails with MemoryError instead of taking the host's memory;
* it is killed and replaced when a render in it has not answered ``GRACE`` seconds after its
  ``render_timeout``. The sandbox's deadline should always stop a render first; this is the
  backstop for one operation that never checks the deadline, or a process that died.

When a step's timeout passes while its render is in a process, the step stops waiting at
once; the process finishes that render (within its deadline) before it takes another.

**Templates registered over the API never render on the loop** (``Renderer.untrusted()``).
The slice is checked *between* Jinja operations, so one long operation — ``sum`` over a
30,000-item ``map``, a ``slice`` into twenty million lists, a ``translate`` that builds a
gigabyte — would run to its end on the loop, slice or not. The sandbox bounds the ones known
to grow with a caller's parameters before they run (``lipsum(params.n)`` held the service
for 67 s before it did; see ``sandbox``), but such a list is never complete; a render process
bounds them all (its deadline, then the kill ``GRACE`` seconds later, and its memory cap). It
costs about a millisecond per render. Built-in templates and template files are trusted:
they are the operator's own code, as the configuration is, and a render process for each of
their renders would double a task's CPU.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, ParamSpec, TypeVar

from orchestra.config import LimitSettings
from orchestra.errors import OrchestraError, RenderError
from orchestra.templating import sandbox

#: How long a render may hold the event loop before it moves to a render process, seconds.
INLINE_SLICE = 0.005
#: Seconds past ``render_timeout`` before an unanswered render process is killed.
GRACE = 2.0
#: Seconds a new render process may take to start (fork, set its limits) before it is given
#: up on. Not counted in a render's time: on a loaded machine a start took over 3 s.
START_LIMIT = 60.0
#: How much lower a render process's CPU priority is than the service's.
RENDER_NICENESS = 10

P = ParamSpec("P")
T = TypeVar("T")
#: Modules a render process needs, imported once by the fork server rather than per process:
#: ``orchestra.kinds`` holds the llm step's message rendering (importing it on a process's
#: first llm step took 300 ms, longer than a tight step timeout).
_PRELOAD = ["orchestra.templating.render", "orchestra.templating.loader", "orchestra.kinds"]


def _context() -> multiprocessing.context.BaseContext:
    """Fork server where there is one (a new render process then costs ~15 ms, not the
    ~250 ms of importing everything again), spawn elsewhere. Never plain fork: the service
    has threads."""
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload(_PRELOAD)
    return context


_CONTEXT = _context()


def _start_child(limits: LimitSettings) -> None:
    """Set up a render process: the service's limits, the memory cap, no Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops its children itself
    try:
        # Renders are batch work: when cores are short, the service's requests go first.
        os.nice(RENDER_NICENESS)
    except (AttributeError, OSError):
        pass
    sandbox.configure(limits)
    try:
        import resource

        cap = limits.render_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, ValueError, OSError):
        pass  # no RLIMIT_AS here (macOS refuses it): the sandbox's size caps still hold


def _serve(conn: Connection, limits: LimitSettings) -> None:
    """A render process's life: take a job from the pipe, answer it, until the pipe closes."""
    _start_child(limits)
    conn.send(None)  # started: a render's time counts from here
    while True:
        try:
            render, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the service closed its end: it stopped, or replaced this process
        try:
            answer: tuple[bool, Any] = (False, render(*args, **kwargs))
        except BaseException as exc:  # MemoryError too: the caller says what happened
            answer = (True, exc)
        try:
            conn.send(answer)  # pickled first, then written: nothing half-sent
        except Exception as exc:
            conn.send((True, RenderError(f"the result could not be sent back: {exc}")))


def _round_trip(conn: Connection, job: tuple[Any, Any, Any]) -> tuple[bool, Any]:
    """On a thread: send ``job`` to a render process and wait for its answer. Raises
    EOFError when the process dies or is killed before it answers."""
    conn.send(job)
    answer: tuple[bool, Any] = conn.recv()
    return answer


class _RenderProcess:
    """One render process, and the pipe that carries its jobs and answers.

    Not a ``multiprocessing.Pool``: a pool's ``terminate()`` can wait forever (its idle
    worker holds the job queue's lock while it waits for a job, and the pool's handler
    threads must agree to stop), and a service that stops must not wait on it. Here nothing
    is shared with the child but a pipe: killing it is one signal, and a caller waiting on
    the pipe gets EOF.
    """

    def __init__(self, limits: LimitSettings, threads: ThreadPoolExecutor) -> None:
        self._limits = limits
        self._threads = threads
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    def _start(self) -> tuple[BaseProcess, Connection]:
        ours, theirs = _CONTEXT.Pipe()
        process = _CONTEXT.Process(  # type: ignore[attr-defined]
            target=_serve, args=(theirs, self._limits), name="orchestra-render", daemon=True
        )
        process.start()
        theirs.close()  # the child holds it now: its death is our EOF
        try:
            if not ours.poll(START_LIMIT):
                raise RenderError(f"the render process did not start within {START_LIMIT:g}s")
            ours.recv()
        except BaseException as exc:  # not started: nothing of it is kept
            ours.close()
            process.kill()
            process.join(5)
            if isinstance(exc, (EOFError, OSError)):
                raise RenderError(
                    f"the render process exited as it started (exit code {process.exitcode})"
                ) from None
            raise
        return process, ours

    async def ready(self) -> None:
        """Start the process if it is not running, and wait until it can take a job.

        Raises:
            RenderError: it did not start (within :data:`START_LIMIT`, or it exited).
        """
        if self._process is None or self._conn is None:
            loop = asyncio.get_running_loop()
            self._process, self._conn = await loop.run_in_executor(self._threads, self._start)

    async def call(self, render: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Run ``render(*args, **kwargs)`` in the process (started now if it is not)."""
        loop = asyncio.get_running_loop()
        await self.ready()  # started already by a pool's job; a caller of its own starts it
        process, conn = self._process, self._conn
        assert process is not None and conn is not None  # set just above
        trip = functools.partial(_round_trip, conn, (render, args, kwargs))
        try:
            failed, value = await loop.run_in_executor(self._threads, trip)
        except (EOFError, OSError):  # it died (or was killed) before it answered
            await self.stop()
            raise RenderError(
                f"the render process exited before it answered (exit code {process.exitcode})"
            ) from None
        if failed:
            raise value
        return value

    async def stop(self) -> None:
        """Kill the process; the next call starts a new one."""
        process, self._process, self._conn = self._process, None, None
        if process is not None and process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, 5)


class Renderer:
    """Runs renders: on the event loop while they are quick, in a render process when not.

    ``untrusted()`` gives a renderer over the same processes that never renders on the loop,
    for templates registered over the API (see the module docstring of why).
    """

    def __init__(self, limits: LimitSettings, *, _shared: _Processes | None = None) -> None:
        sandbox.configure(limits)  # renders on the loop; the processes configure themselves
        self._limits = limits
        self._shared = _shared or _Processes(limits)
        self._inline = _shared is None

    def untrusted(self) -> Renderer:
        """A renderer over the same processes that runs every render in one of them."""
        return Renderer(self._limits, _shared=self._shared)

    async def __call__(self, render: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``render(*args, **kwargs)``, without holding the loop for more than the slice.

        ``render`` must be pure and importable by name (a module-level function), and its
        arguments and result picklable, since a slow one runs again in a render process.
        """
        if self._inline:
            with sandbox.inline(INLINE_SLICE):
                try:
                    return render(*args, **kwargs)
                except sandbox.OutOfSlice:
                    pass
        result: T = await self._shared.run(render, args, kwargs)
        return result

    async def isolated(self, render: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``render(*args, **kwargs)`` in a render process, once one is free."""
        result: T = await self._shared.run(render, args, kwargs)
        return result

    async def offload(self, seconds: float, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in a render process, killed after ``seconds`` (for work whose
        time is bounded by its input, such as parsing a template, rather than by
        ``render_timeout``)."""
        result: T = await self._shared.run(work, args, {}, limit=seconds)
        return result

    async def close(self) -> None:
        """Stop every render process, abandoning renders still running."""
        await self._shared.close()


class _Processes:
    """The render processes, shared by a renderer and its ``untrusted()`` twin."""

    def __init__(self, limits: LimitSettings) -> None:
        self._limits = limits
        # One thread per process, to wait on its pipe: a process answers one job at a time.
        self._threads = ThreadPoolExecutor(
            max_workers=limits.render_processes, thread_name_prefix="orchestra-render"
        )
        self._processes = [
            _RenderProcess(limits, self._threads) for _ in range(limits.render_processes)
        ]
        self._idle: asyncio.Queue[_RenderProcess] | None = None
        self._jobs: set[asyncio.Task[Any]] = set()

    async def run(
        self,
        render: Callable[..., Any],
        args: Any,
        kwargs: Any,
        *,
        limit: float | None = None,
        late: str | None = None,
    ) -> Any:
        """``render(*args, **kwargs)`` in a free process, which is replaced when it has not
        answered within ``limit`` seconds (a render's: ``render_timeout`` plus ``GRACE``);
        ``late`` is the error's message then (the render's by default)."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for process in self._processes:
                self._idle.put_nowait(process)
        process = await self._idle.get()
        if limit is None:
            limit = self._limits.render_timeout + GRACE
            late = (
                f"the render had not finished after {limit:g}s ([limits] render_timeout "
                f"{self._limits.render_timeout:g}s, plus {GRACE:g}s), so its process was "
                "replaced"
            )
        late = late or f"the work had not finished after {limit:g}s, so its process was replaced"
        job = asyncio.create_task(self._job(self._idle, process, limit, late, render, args, kwargs))
        self._jobs.add(job)
        job.add_done_callback(self._forget)
        # The job keeps its process until the render answers, even if the caller leaves.
        return await asyncio.shield(job)

    def _forget(self, job: asyncio.Task[Any]) -> None:
        self._jobs.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved: the caller may have stopped waiting for it

    async def _job(
        self,
        idle: asyncio.Queue[_RenderProcess],
        process: _RenderProcess,
        limit: float,
        late: str,
        render: Callable[..., Any],
        args: Any,
        kwargs: Any,
    ) -> Any:
        try:
            await process.ready()  # a new process's start is not counted in the render's time
            async with asyncio.timeout(limit):
                return await process.call(render, args, kwargs)
        except TimeoutError:
            await process.stop()
            raise RenderError(late) from None
        except OrchestraError:
            raise
        except MemoryError:
            raise RenderError(
                "the render ran out of memory ([limits] render_memory_mb "
                f"{self._limits.render_memory_mb})"
            ) from None
        except Exception as exc:  # the result could not be sent back, the process failed
            raise RenderError(f"the render process failed: {type(exc).__name__}: {exc}") from None
        finally:
            idle.put_nowait(process)

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*(p.stop() for p in self._processes))
        self._threads.shutdown(wait=False)
