"""The supervisor of a model process: start it, talk to it, survive its crashes.

Native inference code can crash: a CPU feature the build assumed (AMX on some VMs), a bad
GGUF file, a driver, running out of memory. So the embedded model never runs inside the
service: :class:`ModelProcess` spawns ``python -m orchestra.llm.model_child`` (a fresh
interpreter, never a fork), talks to it in :mod:`orchestra.llm.model_wire` frames over its
stdin and stdout, and watches it.

The states (:class:`~orchestra.llm.base.ProcessState`)::

    idle ──first call (or preload)──► starting ──loaded, one token generated──► ready
      ▲                                  │                                       │
      │                           crash  ▼                          crash        │
      └──── backoff 1, 2, 4 … 60 s ── restarting ◄───────────────────────────────┘
                                         │ 3 crashes within 5 minutes, or the model
                                         ▼ cannot be loaded at all
                                       down ──a health check's probe (a fresh process
                                              that loads and generates one token)──► ready

One request is in the process at a time (the model is not thread-safe); callers wait their
turn here, in order, so a caller that gives up while waiting never reaches the process.

When the process dies, the call in flight fails at once with ``ProviderUnreachable`` naming
the signal and what it was doing, so a fallback chain moves on within the same attempt and a
task with no other model is retried. The provider is unavailable until the process is ready
again, so chains try their other models first; a call that reaches it anyway waits for the
restart. While it is down, calls fail at once.

The process ends with the service: ``stop()`` closes its stdin (it exits on end-of-file) and
kills it if it lingers; if the service is killed, the end-of-file and Linux's parent-death
signal end it. Every exit is reaped here, so no zombie remains.

Crashes, by phase, and restarts after them are counted (:mod:`orchestra.metrics`:
``orchestra_model_process_crashes_total``, ``orchestra_model_process_restarts_total``) as
``info()`` counts them; an end on purpose (stop, hung, unreadable frames) is neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestra import logs, metrics
from orchestra.errors import ProviderError, ProviderUnreachable
from orchestra.llm import model_wire as wire
from orchestra.llm.base import Crash, Phase, ProcessInfo, ProcessState
from orchestra.llm.model_crashes import Backoff, CrashHistory, describe
from orchestra.llm.model_handle import (
    STDERR_LINE_CHARS,
    Call,
    Child,
    child_command,
    fail,
    rss_bytes,
)

log = logs.get("orchestra.llm.model_process")

State = ProcessState

#: Seconds a cancelled request may take to stop before its process is ended as hung.
CANCEL_GRACE = 10.0
#: Seconds a process gets to exit after its stdin closes, at stop.
STOP_GRACE = 5.0

#: What the warm-up asks: one token, so a build that crashes on generation fails here.
_WARM_UP = wire.Generate(
    id=0, messages=[{"role": "user", "content": "Hi"}], options={"max_tokens": 1}
)


def _read_result(task: asyncio.Task[Any]) -> None:
    """A background start's failure is recorded in the state; nothing more to report."""
    if not task.cancelled():
        task.exception()


class ModelProcess:
    """Runs one model in a supervised child process (see the module docstring)."""

    def __init__(
        self,
        name: str,
        load: wire.Load,
        *,
        timeout: float = 300.0,
        backoff: Backoff | None = None,
        command: Sequence[str] | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_every: float = 30.0,
    ) -> None:
        self.name = name
        self.load = load
        self.timeout = timeout
        #: Seconds between health checks, each of which may probe a process that is down.
        self.probe_every = probe_every
        self.crashes = CrashHistory(backoff or Backoff(), clock)
        self.command = list(command or child_command())
        self.on_change = on_change
        self._clock = clock
        self._ids = itertools.count(1)
        self._turn = asyncio.Lock()
        #: An abandoned call still in the process (cancelled there, not yet ended): the turn
        #: is given on once it ends, or once its process is ended for not stopping.
        self._settling: asyncio.Future[wire.FromChild] | None = None
        #: The tasks that give the turn on after such a call (kept: asyncio holds weakly).
        self._handing_on: set[asyncio.Task[None]] = set()
        self._state = State.IDLE
        self._detail = "starts on first use"
        self._child: Child | None = None
        self._starting: asyncio.Task[Child] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._restarts = 0
        self._restart_due: float | None = None
        self.loaded: wire.Loaded | None = None
        metrics.model_process_known(name, (phase.value for phase in Phase))

    # -- what callers see ---------------------------------------------------------------------

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def detail(self) -> str:
        """The state in words, with the reason when it cannot serve."""
        return self._detail

    @property
    def serving(self) -> bool:
        """Whether a call now would be served (or wait for a start) rather than fail at once."""
        return self._state in (State.IDLE, State.STARTING, State.READY)

    @property
    def working(self) -> bool:
        """Whether the process is working on a request now."""
        child = self._child
        return child is not None and child.current is not None

    def info(self) -> ProcessInfo:
        """The process as it is now: state, pid, memory, crashes."""
        child = self._child
        pid = child.proc.pid if child is not None and not child.exited.is_set() else None
        restart_at = None
        if self._restart_due is not None:
            restart_at = time.time() + max(0.0, self._restart_due - self._clock())
        return ProcessInfo(
            state=self._state,
            pid=pid,
            rss_bytes=rss_bytes(pid) if pid else None,
            restarts=self._restarts,
            crashes=self.crashes.total,
            last_crash=self.crashes.last,
            restart_at=restart_at,
        )

    async def request(
        self,
        message: Callable[[int], wire.Generate | wire.Embed],
        on_text: Callable[[str], None] | None = None,
    ) -> wire.Generated | wire.Embedded:
        """Send ``message(id)`` when it is its turn, and wait for the answer, streaming text
        to ``on_text``. The turn comes once the call before has ended in the process: one
        abandoned there (cancelled, timed out) holds it until it stops, or its process is
        ended for not stopping (a call sent meanwhile failed with it).

        Raises:
            ProviderUnreachable: the process is down, or died during the call or its start.
            ProviderError: the model refused the request (too long a prompt, a bad schema).
            TimeoutError: no answer within ``timeout`` from its turn (the wait for the turn is
                not counted: three queued calls failed without reaching the model); the
                request is then cancelled in the process.
        """
        await self._turn.acquire()
        try:
            async with asyncio.timeout(self.timeout):
                child = await self._ready()
                answer = await self._ask(child, message(next(self._ids)), on_text)
        finally:
            self._hand_on()
        if isinstance(answer, wire.Failed):
            raise ProviderError(f"embedded model failed: {answer.message}")
        assert isinstance(answer, (wire.Generated, wire.Embedded))
        self.crashes.answered()
        return answer

    async def preload(self) -> None:
        """Start the process now instead of on first use; failures are recorded, not raised."""
        with contextlib.suppress(ProviderUnreachable):
            await self._ready()

    def probe(self) -> None:
        """When down, try a fresh process (load, one token) in the background; on success it
        serves. The state says how it goes."""
        if self._state is not State.DOWN or self._starting is not None:
            return
        log.info("model_process.probe", provider=self.name)
        self._set(State.STARTING, "probing: loading the model in a fresh process")
        self._starting = logs.shared_task(self._start(probe=True), f"{self.name}-probe")
        self._starting.add_done_callback(_read_result)

    async def stop(self) -> None:
        """End the process (stdin closed, then killed after ``STOP_GRACE``); no restarts."""
        self._set(State.STOPPED, "stopped")
        self._restart_due = None
        for task in (self._restart, self._starting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        child, self._child = self._child, None
        if child is not None:
            await self._end(child, "the service is stopping")

    # -- starting -----------------------------------------------------------------------------

    async def _ready(self) -> Child:
        """The running process: started first when idle, waited for while it starts or
        restarts (a router tries other available models first: this one is marked
        unavailable meanwhile); an error at once when it is down or stopped."""
        while True:
            if self._state is State.READY and self._child is not None:
                return self._child
            if self._state is State.IDLE:
                self._set(State.STARTING, "loading the model")
                # Its reader outlives this call: not in the context of the task that asked.
                self._starting = logs.shared_task(self._start(probe=False), self.name)
            waiting: asyncio.Task[Any] | None = None
            if self._state is State.STARTING:
                waiting = self._starting
            elif self._state is State.RESTARTING:
                waiting = self._restart
            if waiting is None:
                # Down: nothing comes back before a health check's probe, so a task's retry
                # waits for it (a backlog used up its attempts in a second).
                down = self._state is State.DOWN
                raise ProviderUnreachable(
                    f"embedded provider {self.name!r}: {self._detail}",
                    retry_after=self.probe_every if down else 0.0,
                )
            try:
                await asyncio.shield(waiting)  # then look again: it may have died since
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._state is State.STOPPED and current and not current.cancelling():
                    raise ProviderUnreachable(f"embedded provider {self.name!r}: stopped") from None
                raise

    async def _start(self, probe: bool) -> Child:
        """Spawn, load, generate one token; ready on success (recorded as a crash, restarting
        or down when not)."""
        try:
            child = await self._spawn(probe)
            try:
                async with asyncio.timeout(self.timeout):
                    self.loaded = await asyncio.shield(child.loaded)
                    child.warming = True
                    warm = Call(Phase.WARMING_UP, None)
                    child.calls[_WARM_UP.id] = warm
                    await child.send(_WARM_UP)
                    answer = await asyncio.shield(warm.done)
                    child.warming = False
                    # What the load and the warm-up printed is no crash's cause later on.
                    child.stderr.clear()
            except TimeoutError:
                await self._end(child, f"it did not load within {self.timeout:g}s")
                raise ProviderUnreachable(
                    f"embedded model {self.load.model_path} did not load within {self.timeout:g}s"
                ) from None
            if isinstance(answer, wire.Failed):
                await self._end(child, "its warm-up failed")
                raise ProviderUnreachable(f"the warm-up generation failed: {answer.message}")
            child.probe = False  # from now on it is a process like any other
            if probe:
                self.crashes.forgive()
            self._set(State.READY, f"ready (loaded in {self.loaded.load_ms:.0f} ms)")
            return child
        except ProviderUnreachable as exc:
            # A crash has already moved on to restarting or down; anything else (no answer in
            # time, a failed warm-up) leaves it down until a health check's probe succeeds.
            if self._state is State.STARTING:
                self._set(State.DOWN, exc.message)
            raise
        finally:
            self._starting = None

    async def _spawn(self, probe: bool) -> Child:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            self._set(State.DOWN, f"cannot start the model process: {exc}")
            raise ProviderUnreachable(f"embedded provider {self.name!r}: {self._detail}") from exc
        child = self._child = Child(proc, probe)
        child.tasks = [
            asyncio.create_task(self._read(child), name=f"{self.name}-reader"),
            asyncio.create_task(self._read_stderr(child), name=f"{self.name}-stderr"),
        ]
        log.info("model_process.started", provider=self.name, pid=proc.pid, probe=probe)
        await child.send(self.load)
        return child

    # -- one request --------------------------------------------------------------------------

    async def _ask(
        self,
        child: Child,
        message: wire.Generate | wire.Embed,
        on_text: Callable[[str], None] | None,
    ) -> wire.FromChild:
        phase = Phase.GENERATION if isinstance(message, wire.Generate) else Phase.EMBEDDING
        call = Call(phase, on_text)
        if child.exited.is_set():  # died after it was found ready: its calls were failed
            raise ProviderUnreachable(f"embedded provider {self.name!r}: {self._detail}")
        child.calls[message.id] = call
        try:
            await child.send(message)
            return await asyncio.shield(call.done)
        except BaseException:
            if not call.done.done():
                await self._abandon(child, message.id, call)
            raise

    def _hand_on(self) -> None:
        """Give the turn to the next call: now, or once the abandoned call has ended."""
        settling, self._settling = self._settling, None
        if settling is None or settling.done():
            self._turn.release()
            return
        task = logs.shared_task(self._hand_on_after(settling), f"{self.name}-turn")
        self._handing_on.add(task)
        task.add_done_callback(self._handing_on.discard)

    async def _hand_on_after(self, settling: asyncio.Future[wire.FromChild]) -> None:
        try:
            # Ended by then: the process is ended at CANCEL_GRACE when the call has not.
            await asyncio.wait([settling], timeout=CANCEL_GRACE + STOP_GRACE)
        finally:
            self._turn.release()

    async def _abandon(self, child: Child, request_id: int, call: Call) -> None:
        """The caller stopped waiting: cancel in the process, and end the process if the
        request has not stopped ``CANCEL_GRACE`` seconds later (native code that hangs).
        The turn waits for it (:meth:`_hand_on`)."""
        call.abandoned = True
        self._settling = call.done

        def check() -> None:
            if request_id in child.calls and not child.exited.is_set():
                log.error("model_process.hung", provider=self.name, pid=child.proc.pid)
                child.ended_by = f"it did not stop within {CANCEL_GRACE:g}s of a cancel"
                self._kill(child)

        # Set before the send: a second cancel during it would leave a hung process alive.
        asyncio.get_running_loop().call_later(CANCEL_GRACE, check)
        await child.send(wire.Cancel(request_id))

    # -- reading ------------------------------------------------------------------------------

    async def _read(self, child: Child) -> None:
        """Hand each frame to its waiter; when the pipe ends, find out why."""
        stdout = child.proc.stdout
        assert stdout is not None
        try:
            while True:
                header = await stdout.readexactly(wire.HEADER.size)
                body = await stdout.readexactly(wire.body_length(header))
                self._dispatch(child, wire.from_child.decode(body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the process closed its stdout: it is exiting
        except Exception as exc:  # unreadable frames, or a bug here: end it, never leave it
            log.error("model_process.unreadable", provider=self.name, error=repr(exc))
            child.ended_by = f"its answers could not be read ({type(exc).__name__})"
            self._kill(child)
        finally:
            returncode = await child.proc.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):  # the rest of its stderr, for the report
                    await asyncio.gather(*child.tasks[1:], return_exceptions=True)
            child.exited.set()
            self._exited(child, returncode)

    def _dispatch(self, child: Child, message: wire.FromChild) -> None:
        if isinstance(message, wire.Loaded):
            if not child.loaded.done():
                child.loaded.set_result(message)
            return
        if isinstance(message, wire.Failed) and message.id == 0 and message.reason == "load":
            # A setting to fix (a corrupt or wrong file), said where an operator looks: it was
            # an info line of the state alone, with /health "degraded".
            log.warning("model_process.load_failed", provider=self.name, error=message.message)
            child.ended_by = "the model could not be loaded"
            self._set(State.DOWN, message.message)
            fail(
                child.loaded,
                ProviderUnreachable(f"embedded provider {self.name!r}: {message.message}"),
            )
            return
        if isinstance(message, wire.Started):
            child.current = message.id
            return
        call = child.calls.get(message.id)
        if call is None:
            return
        if isinstance(message, wire.Text):
            if call.on_text is not None and not call.abandoned:
                try:
                    call.on_text(message.text)
                except Exception as exc:  # the listener's bug must not stop the reading
                    log.error("model_process.on_text_failed", provider=self.name, error=repr(exc))
            return
        del child.calls[message.id]
        if child.current == message.id:
            child.current = None
        if not call.done.done():
            call.done.set_result(message)

    async def _read_stderr(self, child: Child) -> None:
        """Keep the process's last lines of output (whatever their length) for a crash."""
        stderr = child.proc.stderr
        assert stderr is not None
        pending = b""
        while chunk := await stderr.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > STDERR_LINE_CHARS:
                lines, pending = [*lines, pending], b""
            for raw in lines:
                self._output(child, raw)
        self._output(child, pending)

    def _output(self, child: Child, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()[:STDERR_LINE_CHARS]
        if line:
            child.stderr.append(line)
            log.debug("model_process.output", provider=self.name, line=line)

    # -- ending -------------------------------------------------------------------------------

    def _exited(self, child: Child, returncode: int) -> None:
        """The process is gone: fail what was in flight, then restart, back off or stay down."""
        phase = child.phase
        crash = None
        if child.ended_by is not None:
            error = ProviderUnreachable(
                f"embedded model process ended: {child.ended_by} (during {phase})"
            )
        else:
            crash = self._crash(child, returncode, phase)
            error = ProviderUnreachable(crash.message)
        for call in child.calls.values():
            fail(call.done, error)
        child.calls.clear()
        fail(child.loaded, error)
        if self._child is child:
            self._child = None
        if crash is not None:
            self._after_crash(child, crash)
        elif self._state is State.READY:
            self._set(State.IDLE, f"starts on next use ({child.ended_by})")

    def _crash(self, child: Child, returncode: int, phase: Phase) -> Crash:
        last = child.stderr[-1] if child.stderr else None
        crash = describe(returncode, phase, last, self.name)
        metrics.model_process_crashed(self.name, phase.value)
        log.error(
            "model_process.crashed",
            provider=self.name,
            pid=child.proc.pid,
            signal=crash.signal,
            exit_code=crash.exit_code,
            phase=phase.value,
            stderr=list(child.stderr)[-5:],
        )
        return crash

    def _after_crash(self, child: Child, crash: Crash) -> None:
        recent = self.crashes.record(crash)
        if self._state is State.STOPPED:
            return
        if child.probe or self.crashes.gives_up(recent):
            self._set(
                State.DOWN,
                f"down after {recent} crash(es) within {self.crashes.backoff.window:g}s; "
                f"last: {crash.message}. A health check tries a fresh process.",
            )
            return
        delay = self.crashes.next_delay()
        self._restart_due = self._clock() + delay
        self._set(State.RESTARTING, f"restarting in {delay:g}s; last: {crash.message}")
        self._restart = asyncio.create_task(self._restart_after(delay), name=f"{self.name}-restart")

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._restart_due = None
        self._restart = None  # a crash of the new process schedules a restart of its own
        if self._state is not State.RESTARTING:
            return
        self._restarts += 1
        metrics.model_process_restarted(self.name)
        self._set(State.STARTING, "restarting after a crash: loading the model")
        self._starting = asyncio.create_task(self._start(probe=False), name=self.name)
        with contextlib.suppress(ProviderUnreachable):
            await asyncio.shield(self._starting)  # a crash again is recorded by the reader

    async def _end(self, child: Child, why: str) -> None:
        """End a process on purpose: close its stdin, then kill it if it lingers."""
        child.ended_by = child.ended_by or why
        stdin = child.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        try:
            async with asyncio.timeout(STOP_GRACE):
                await child.exited.wait()
        except TimeoutError:
            self._kill(child)
            await child.proc.wait()
        await asyncio.gather(*child.tasks, return_exceptions=True)

    def _kill(self, child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()

    def _set(self, state: ProcessState, detail: str) -> None:
        if self._state is State.STOPPED:
            return  # stopped for good: nothing starts, probes or restarts any more
        changed = (state, detail) != (self._state, self._detail)
        self._state, self._detail = state, detail
        if changed:
            # The process is shared: not in the context of the task whose call started it.
            contextvars.Context().run(
                log.info,
                "model_process.state",
                provider=self.name,
                state=state.value,
                detail=detail,
            )
            if self.on_change is not None:
                self.on_change()
