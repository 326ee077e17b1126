"""Serving: one service process, or several under a supervisor (``[server] processes``).

One process (the default) runs in the ``orchestra serve`` process itself: :func:`run_service`.

With N processes, the ``orchestra serve`` process becomes a supervisor that serves nothing
itself. It binds the listening socket once and starts N fresh interpreters (multiprocessing's
spawn), each handed the socket and the settings the supervisor resolved, each a whole service
(:func:`run_service`): its own database connections, worker pool and HTTP server on the shared
socket (the kernel gives each connection to one of them). The first process starts alone: it
upgrades the database and, on a first start beyond loopback, makes and prints the admin key;
the others load their modules meanwhile, and start once it serves. A startup failure (a
broken template, a database that cannot be opened) ends the supervisor with the message the
one process would print.

While they serve, the supervisor restarts a process that died (after 1, 2, 4 … 30 s when it
keeps dying), kills and restarts one whose event loop gave no sign of life for ``[server]
hang_timeout`` seconds (a hung process still takes its share of new connections), passes
SIGHUP on (each reloads its templates, one still starting once it serves; a process waiting
to be started again starts at once),
and on SIGTERM or SIGINT stops them all: each stops claiming at once, drains HTTP, gives its
running tasks ``[workers] shutdown_grace`` seconds and hands back the rest
(:mod:`orchestra.worker`); a second signal hurries them. The supervisor exits once every
process has; one that outlives the deadline is killed. A process dies with the supervisor
(Linux's parent-death signal), so none is left behind if it is killed. The processes' side of
all this is :mod:`orchestra.supervised`.

Why not uvicorn's own supervisor (``uvicorn.supervisors.Multiprocess``): it builds a plain
``uvicorn.Server`` from a pickled ``uvicorn.Config`` in each child (the HTTP protocol here is
a class made at run time, which does not pickle, and the early stop on SIGTERM needs the
server of :mod:`orchestra.api.server`), starts every child at once (each would race to upgrade
the database and make the admin key), restarts all children on SIGHUP instead of passing it
on, and waits for stopping children without a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

import msgspec

from orchestra import logs, metrics_folder
from orchestra.config import Settings
from orchestra.errors import OrchestraError, StartupFailed, TemplateError
from orchestra.listening import bind_socket
from orchestra.supervised import (
    BEAT_SECONDS,
    FAILED,
    GO,
    HURRY,
    READY,
    RESCUE,
    STOP,
    child_main,
)

if TYPE_CHECKING:
    from orchestra.api.runtime import Runtime, ShowKey
    from orchestra.api.server import Server

log = logs.get("orchestra.supervisor")

#: Seconds uvicorn waits for open HTTP requests to finish on shutdown, before the lifespan
#: stops the worker pool.
HTTP_DRAIN_SECONDS = 5
#: Seconds a stopping process gets beyond its HTTP drain and ``shutdown_grace`` to exit.
EXIT_SLACK_SECONDS = 10.0
#: First and longest wait before a process that died is started again, in seconds; a process
#: that served this long before it died is restarted after the first wait again.
RESTART_FIRST, RESTART_CAP, RESTART_RESET = 1.0, 30.0, 60.0
#: The exit code of a process that failed to start (uvicorn's too).
STARTUP_FAILURE = 3


def startup_message(exc: OrchestraError) -> str:
    """What ``orchestra serve`` prints when the service could not start: the error, or every
    problem of the templates."""
    if isinstance(exc, TemplateError):
        lines = "\n".join(f"  {p}" for p in exc.problems)
        return f"invalid templates:\n{lines}"
    return exc.message


def run_service(
    settings: Settings,
    *,
    show_key: ShowKey | None = None,
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[Server], None] | None = None,
) -> None:
    """Serve in this process until a stop signal: the API and workers as ``[server]`` says.

    Args:
        settings: The resolved settings.
        show_key: Receives the admin key a first start beyond loopback makes (None: none is
            made).
        sockets: Listen on these (a supervisor's shared socket), not on ``[server]``'s address.
        on_started: Called with the server once the lifespan started and it listens (in its
            event loop).

    Raises:
        OrchestraError: what stopped the service from starting (the port is taken, a
            template, the database).
        SystemExit: uvicorn's own startup failure, which it logged.
    """
    from orchestra.api.app import create_app
    from orchestra.api.server import Server, UvicornNotes, server_config

    if sockets is None:
        # The port first, before the lifespan starts the workers: a service that cannot
        # listen must not claim (and run) tasks of the database it shares with the one that
        # holds the port. Alone on it: no SO_REUSEPORT, so a running service, single or
        # supervised, keeps it.
        sockets = [bind_socket(settings.server.host, settings.server.port, shared=False)]

    # The lifespan opens and checks everything before uvicorn accepts a connection; when it
    # fails, uvicorn exits and the caller prints the error.
    app = create_app(settings, env=os.environ, show_key=show_key)
    runtime: Runtime = app.runtime
    config = server_config(app, settings.server, timeout_graceful_shutdown=HTTP_DRAIN_SECONDS)
    server = Server(config, runtime, on_started)
    quiet = UvicornNotes(runtime)
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets)
    except SystemExit:  # uvicorn's way out when the lifespan failed to start
        if runtime.startup_error is None:
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    if runtime.startup_error is not None:
        raise runtime.startup_error
    if not server.started:
        raise SystemExit(1)


#: How long a process first seen late is given to beat before it is killed as hung.
SECOND_LOOK = 2 * BEAT_SECONDS


@dataclass
class _Child:
    """One service process and the supervisor's end of its pipe."""

    index: int
    process: SpawnProcess
    pipe: Connection
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    #: A SIGHUP came while it started: passed on once it serves (before, its default action
    #: would kill it), so a change made meanwhile is read.
    reload_due: bool = False
    #: Why it could not start, as it said (None: it did not say).
    failure: str | None = None
    #: Seconds it had given no sign of life when it was killed for it (None: it was not).
    hung_s: float | None = None
    #: When it was first seen late (None: it is not): it is killed only if it is still
    #: silent a second look later (a frozen process group, Ctrl-Z then fg, or a paused
    #: container, wakes with every process late: their beats come within a second).
    late_at: float | None = None
    #: Its worker pool's name, as it said once it served ("": it runs no workers).
    owner: str = ""


class Supervisor:
    """Runs ``[server] processes`` service processes on one socket until a stop signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.server.processes
        self._spec = msgspec.json.encode(settings)
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, _Child] = {}
        #: Process slots waiting to be started again, and when (monotonic seconds).
        self._restart_at: dict[int, float] = {}
        self._restart_wait: dict[int, float] = {}
        self._signals: list[int] = []
        #: The worker pools of processes that died, and how each died: their tasks, for a
        #: serving process to take back (:meth:`_hand_over`).
        self._orphans: dict[str, str] = {}
        #: Process slots whose latest start failed: when every one has, nothing serves and
        #: nothing will by itself, and the supervisor exits (as a single process does).
        self._failed: set[int] = set()
        self._stopping = False
        #: The signal that stopped the supervisor (None: it stopped on a failure).
        self._stop_signal: str | None = None
        #: Each process slot's latest sign of life (monotonic seconds), written by the
        #: process (:class:`orchestra.supervised.Link`).
        self._beats: Any = self._context.RawArray("d", self.count)
        self._wake_r, self._wake_w = socket.socketpair()

    def run(self) -> int:
        """Start the processes, keep them running until SIGTERM or SIGINT, then stop them.

        Returns:
            0 when every process exited by itself once asked to, 1 when one had to be killed.

        Raises:
            ConfigError: the address cannot be bound.
            StartupFailed: a process failed to start (the message is its error).
        """
        host, port = self.settings.server.host, self.settings.server.port
        if port:
            # Alone first, as one process binds: the shared socket below would share the port
            # with another supervisor's processes (SO_REUSEPORT: same user), and the two would
            # split its connections, each on its own database.
            bind_socket(host, port, shared=False).close()
        sock = bind_socket(host, port)
        undo = self._catch_signals()
        unshare = metrics_folder.share_between_processes()  # one scrape answers for every process
        try:
            s = self.settings.server
            log.info("supervisor.listening", host=s.host, port=sock.getsockname()[1])
            # The first alone: it upgrades the database and makes the admin key, once; the
            # others import meanwhile (most of a start), then wait for the word to go on.
            self._start(0, sock, bootstrap=True)
            for index in range(1, self.count):
                self._start(index, sock, bootstrap=False, go=False)
            if self._until_ready([0]):
                for index in range(1, self.count):
                    self._children[index].pipe.send(GO)
                if self._until_ready(list(self._children)):
                    log.info(
                        "supervisor.started",
                        processes=self.count,
                        pids=[c.process.pid for c in self._children.values()],
                        api=s.api,
                        workers=s.workers,
                    )
                    self._serve(sock)
        finally:
            code = self._stop_all()
            unshare()
            undo()
            sock.close()
            self._wake_r.close()
            self._wake_w.close()
        return code

    # -- processes --------------------------------------------------------------------------

    def _start(self, index: int, sock: socket.socket, *, bootstrap: bool, go: bool = True) -> None:
        """Start process ``index``; unless ``go``, it waits for
        :data:`~orchestra.supervised.GO` before it serves."""
        ours, theirs = self._context.Pipe()
        self._beats[index] = 0.0
        self._failed.discard(index)  # its latest start is this one, not yet failed
        process = self._context.Process(
            target=child_main,
            args=(self._spec, sock, theirs, bootstrap, os.getpid(), self._beats, index),
            name=f"orchestra-{index + 1}",
        )
        process.start()
        theirs.close()
        if go and not bootstrap:
            ours.send(GO)
        self._children[index] = _Child(index, process, ours)
        log.info("supervisor.process_started", process=index + 1, pid=process.pid)

    def _until_ready(self, indices: list[int]) -> bool:
        """Wait until these processes are ready. False when a stop signal came first.

        Raises:
            StartupFailed: one exited, or did not start in time.
        """
        limit = self.settings.server.start_timeout
        deadline = time.monotonic() + limit
        while not all(self._children[i].ready for i in indices):
            if self._stopping:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                for index in indices:  # stuck: asking it to stop would wait out the stop
                    child = self._children[index]
                    if not child.ready:
                        log.error(
                            "supervisor.start_timed_out",
                            process=index + 1,
                            pid=child.process.pid,
                            start_timeout_s=limit,
                            action="killed (SIGKILL); the service does not start",
                        )
                        child.process.kill()
                raise StartupFailed(
                    f"a process did not start within {limit:g} s ([server] start_timeout); "
                    "the first start of a new release migrates the database, which can take "
                    "longer (logged as database.migrating): raise [server] start_timeout, as "
                    "each start begins the migration again"
                )
            for child in self._step(left):
                reason = child.failure or (
                    f"process {child.index + 1} exited with "
                    f"{_exit_text(child.process.exitcode)} while starting (see its log)"
                )
                raise StartupFailed(reason)
        return not self._stopping

    def _serve(self, sock: socket.socket) -> None:
        """Keep the processes running until a stop signal."""
        while not self._stopping:
            now = time.monotonic()
            looks = [at - now for at in self._restart_at.values()]
            if (hang_look := self._kill_hung()) is not None:
                looks.append(hang_look)
            if (start_look := self._kill_stuck_starting()) is not None:
                looks.append(start_look)
            timeout = max(0.0, min(looks)) if looks else None
            for child in self._step(timeout):
                self._exited(child)
            self._hand_over()
            now = time.monotonic()
            for index, at in list(self._restart_at.items()):
                if at <= now and not self._stopping:
                    del self._restart_at[index]
                    self._start(index, sock, bootstrap=False)

    def _exited(self, child: _Child) -> None:
        """Log why a process exited while serving, and when it starts again."""
        served = time.monotonic() - child.started_at
        wait_s = self._restart_wait.get(child.index, RESTART_FIRST)
        if child.ready and served >= RESTART_RESET:
            wait_s = RESTART_FIRST
        self._restart_at[child.index] = time.monotonic() + wait_s
        self._restart_wait[child.index] = min(wait_s * 2, RESTART_CAP)
        code = child.process.exitcode
        said = {
            "process": child.index + 1,
            "pid": child.process.pid,
            "exit": _exit_text(code),
            "restart_in_s": wait_s,
            "serving": sum(c.ready for c in self._children.values()),
            "processes": self.count,
        }
        if child.owner:
            how = f"killed after {child.hung_s:g} s hung" if child.hung_s else _exit_text(code)
            which = f"process {child.index + 1}, pid {child.process.pid}"
            self._orphans[child.owner] = f"{which}: {how}"
        if not child.ready:  # started again, and could not start: it will not cure itself
            error = child.failure or f"exited with {_exit_text(code)} while starting"
            log.error(
                "supervisor.restart_failed",
                **said,
                error=error,
                hint="fix what the error names, then SIGHUP the supervisor to start it at once",
            )
            self._failed.add(child.index)
            if len(self._failed) == self.count:  # none serves: exit, for the service manager
                raise StartupFailed(f"no process could start again: {error}")
        elif code == 0:  # a stop signal sent to it, not to the supervisor: it stopped well
            log.info("supervisor.process_stopped", **said)
        else:
            hung = {} if child.hung_s is None else {"hung_s": child.hung_s}
            log.warning("supervisor.process_died", **said, **hung)

    def _hand_over(self) -> None:
        """Ask a serving process to take back the tasks of the processes that died: their
        leases would keep them from every worker until they expire (``lease_seconds``). Kept
        until a process serves; a process that dies before it does so leaves the leases to
        expire as usual."""
        for child in self._children.values():
            if not self._orphans:
                return
            if not child.ready or child.hung_s is not None:  # killed as hung: not reaped yet
                continue
            with contextlib.suppress(OSError):  # it just died: the next one, or a later look
                for owner, cause in list(self._orphans.items()):
                    child.pipe.send((RESCUE, (owner, cause)))
                    del self._orphans[owner]

    def _kill_hung(self) -> float | None:
        """Kill every serving process that gave no sign of life for ``hang_timeout`` seconds
        (its exit then restarts it); returns the seconds until the next one could be late
        (None: none is watched)."""
        limit = self.settings.server.hang_timeout
        if limit <= 0:
            return None
        now = time.monotonic()
        look: float | None = None
        for child in self._children.values():
            if not child.ready or child.hung_s is not None:
                continue
            silent = now - max(self._beats[child.index], child.started_at)
            if silent <= limit:
                child.late_at = None
                left = limit - silent + 0.01
                look = left if look is None else min(look, left)
                continue
            if child.late_at is None:
                child.late_at = now
            if now - child.late_at < SECOND_LOOK:  # late: look again once it could have beat
                left = SECOND_LOOK - (now - child.late_at) + 0.01
                look = left if look is None else min(look, left)
                continue
            child.hung_s = round(silent, 1)
            log.error(
                "supervisor.process_hung",
                process=child.index + 1,
                pid=child.process.pid,
                silent_s=child.hung_s,
                hang_timeout_s=limit,
                action="killed (SIGKILL), to be started again",
            )
            child.process.kill()
        return look

    def _kill_stuck_starting(self) -> float | None:
        """Kill every process started again that has not served within ``start_timeout``
        seconds (hung opening the database, say: it beats only once it serves, so
        :meth:`_kill_hung` does not see it); its exit is then a failed start, tried again
        later. Returns the seconds until the next one could be due (None: none starts)."""
        limit = self.settings.server.start_timeout
        now = time.monotonic()
        look: float | None = None
        for child in self._children.values():
            if child.ready or child.failure is not None:
                continue
            left = limit - (now - child.started_at)
            if left > 0:
                look = left + 0.01 if look is None else min(look, left + 0.01)
                continue
            child.failure = f"did not start within {limit:g} s ([server] start_timeout)"
            log.error(
                "supervisor.start_timed_out",
                process=child.index + 1,
                pid=child.process.pid,
                start_timeout_s=limit,
                action="killed (SIGKILL), to be started again",
            )
            child.process.kill()
        return look

    def _step(self, timeout: float | None) -> list[_Child]:
        """Wait for a message, an exit or a signal (at most ``timeout`` seconds) and take it
        in; returns the processes that exited (no longer among the children)."""
        waiting: list[Any] = [self._wake_r]
        for child in self._children.values():
            waiting += [child.pipe, child.process.sentinel]
        ready = wait(waiting, timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        self._take_signals()
        exited = []
        for child in list(self._children.values()):
            if child.pipe in ready:
                self._read(child)
            if child.process.sentinel in ready:
                child.process.join()
                metrics_folder.process_exited(child.process.pid)
                self._read(child)  # a failure it said just before it exited
                child.pipe.close()
                del self._children[child.index]
                exited.append(child)
        return exited

    def _read(self, child: _Child) -> None:
        with contextlib.suppress(EOFError, OSError):
            while child.pipe.poll():
                kind, text = child.pipe.recv()
                if kind == READY:
                    child.ready = True
                    if child.reload_due:  # its SIGHUP handler is in place once it serves
                        child.reload_due = False
                        _signal(child, signal.SIGHUP)
                    self._failed.discard(child.index)
                    child.owner = text
                    child.started_at = time.monotonic()
                elif kind == FAILED:
                    child.failure = text

    def _stop_all(self) -> int:
        """Ask every process to stop and wait for them; kill those past the deadline."""
        self._stopping = True
        self._restart_at.clear()
        if not self._children:
            return 0
        for child in self._children.values():
            self._tell(child, STOP)
        grace = self.settings.workers.shutdown_grace
        deadline = time.monotonic() + HTTP_DRAIN_SECONDS + grace + EXIT_SLACK_SECONDS
        log.info("supervisor.stopping", processes=len(self._children), grace_s=grace)
        while self._children and (left := deadline - time.monotonic()) > 0:
            self._step(left)
        code = 0
        for child in list(self._children.values()):
            log.error("supervisor.process_killed", process=child.index + 1, pid=child.process.pid)
            child.process.kill()
            child.process.join()
            code = 1
        self._children.clear()
        log.info("supervisor.stopped")
        return code

    # -- signals ----------------------------------------------------------------------------

    def _catch_signals(self) -> Callable[[], None]:
        """Note SIGTERM, SIGINT and SIGHUP, and wake the wait; returns the undo."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def undo() -> None:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return undo

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        self._signals.append(sig)

    def _take_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                # A process waiting to be started again starts now: one that could not start
                # (a broken template) may now, if what was wrong was fixed.
                waiting = sorted(self._restart_at)
                log.info(
                    "supervisor.reload",
                    processes=len(self._children),
                    starting_now=[index + 1 for index in waiting],
                )
                for child in self._children.values():
                    if child.ready:
                        _signal(child, signal.SIGHUP)
                    else:
                        child.reload_due = True
                for index in waiting:
                    self._restart_at[index] = time.monotonic()
                    self._restart_wait[index] = RESTART_FIRST
            elif not self._stopping:
                self._stop_signal = signal.Signals(sig).name
                log.info("supervisor.stop_requested", signal=self._stop_signal)
                self._stopping = True
            else:  # a second Ctrl-C or SIGTERM: each process skips the waits
                log.warning(
                    "supervisor.stop_hurried",
                    signal=signal.Signals(sig).name,
                    processes=len(self._children),
                    skips="HTTP drain and shutdown_grace",
                )
                for child in self._children.values():
                    self._tell(child, HURRY, signal.Signals(sig).name)

    def _tell(self, child: _Child, word: str, signal_name: str | None = None) -> None:
        """Ask a process to stop (:data:`STOP`) or hurry (:data:`HURRY`) on its pipe (see
        :mod:`orchestra.supervised` for why not with a signal). One still starting reads it
        once it serves (a database upgrade is not cut short), or before it starts; to hurry,
        it gets SIGTERM too."""
        with contextlib.suppress(OSError):  # it just exited: its exit is seen next
            child.pipe.send((word, signal_name or self._stop_signal or ""))
        if word == HURRY and not child.ready:
            _signal(child, signal.SIGTERM)


def _signal(child: _Child, sig: int) -> None:
    if child.process.pid is not None and child.process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, sig)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit code {code}"
