"""A service process under the supervisor (:mod:`orchestra.supervisor`): its side of the link.

The supervisor starts each process with :func:`child_main` and keeps a pipe to it. On the
pipe, the process says when it serves, or why it could not start; the supervisor says when
to start serving (after the first process upgraded the database), when to stop, and when to
hurry a stop (a second stop signal to the supervisor).

Why the supervisor asks on the pipe, not with a signal: a stop signal often reaches every
process at once (systemd stops a service with SIGTERM to each of its processes; a terminal's
Ctrl-C goes to the whole process group). Forwarded as a signal, the supervisor's word would
be each process's second signal, which hurries (skips the running tasks' grace); on the pipe
it is one more request to stop, and only a second signal to the process itself, or the
supervisor's word to hurry, hurries.

Each second its event loop runs, the process writes the time into its slot of an array the
supervisor shares with it (:class:`Link`): a process that is alive but hung (stopped, its
loop blocked) stops writing, and the supervisor kills it after ``[server] hang_timeout``.
Shared memory, not the pipe: nothing the process does for it can block, and the supervisor
reads it only when it looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import msgspec

from orchestra import logs
from orchestra.config import Settings
from orchestra.errors import OrchestraError

if TYPE_CHECKING:
    from orchestra.api.runtime import ShowKey
    from orchestra.api.server import Server

log = logs.get("orchestra.supervisor")

#: The supervisor to a process: start serving; stop (with the signal the supervisor got);
#: hurry the stop (likewise); another process died, take its tasks back (its worker pool's
#: name and how it died). A process to the supervisor: it serves (with its worker pool's
#: name, empty without workers); it could not start (with the message).
GO, STOP, HURRY, RESCUE = "go", "stop", "hurry", "rescue"
READY, FAILED = "ready", "failed"
#: The most seconds between two signs of life of a process's event loop.
BEAT_SECONDS = 1.0


class Link:
    """A service process's side of its supervisor, once it serves: the signs of life, and
    the supervisor's word on the pipe.

    Args:
        pipe: This process's end of the pipe.
        beats: The array of signs of life the supervisor shares (monotonic seconds).
        slot: This process's index in ``beats``.
        parent: The supervisor's pid.
        hang_timeout: ``[server] hang_timeout`` (0: no signs of life are given).
    """

    def __init__(
        self, pipe: Connection, beats: Any, slot: int, parent: int, hang_timeout: float
    ) -> None:
        self.pipe = pipe
        self.beats = beats
        self.slot = slot
        self.parent = parent
        self.hang_timeout = hang_timeout
        self._beating: asyncio.Task[None] | None = None
        self._rescues: set[asyncio.Task[None]] = set()

    def started(self, server: Server) -> None:
        """The server listens (called in its event loop): tell the supervisor (with the
        worker pool's name, for a rescue of its tasks should this process die), start the
        signs of life, and listen to the pipe."""
        self.pipe.send((READY, server.runtime.owner))
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._take, server)
        if self.hang_timeout > 0:
            self._beating = loop.create_task(self._beat(), name="supervisor.beat")

    async def _beat(self) -> None:
        # Several a hang_timeout, so that one late beat (a busy loop) is no hang.
        every = min(BEAT_SECONDS, self.hang_timeout / 4)
        while True:
            self.beats[self.slot] = time.monotonic()
            await asyncio.sleep(every)

    def _take(self, server: Server) -> None:
        """A word from the supervisor, or its end of the pipe closed: it is gone."""
        try:
            kind, text = self.pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            # Killed (SIGKILL, the OOM killer): Linux's parent-death signal stops this
            # process too (without it, this does); say why.
            log.warning(
                "supervisor.gone", pid=os.getpid(), supervisor_pid=self.parent, action="stopping"
            )
            server.request_stop(by="supervisor gone")
            return
        if kind in (STOP, HURRY):
            server.request_stop(hurry=kind == HURRY, signal=text or None, by="supervisor")
        elif kind == RESCUE:
            owner, cause = text
            rescue = asyncio.get_running_loop().create_task(server.runtime.rescue(owner, cause))
            self._rescues.add(rescue)
            rescue.add_done_callback(self._rescues.discard)


def child_main(
    spec: bytes,
    sock: socket.socket,
    pipe: Connection,
    bootstrap: bool,
    parent: int,
    beats: Any,
    slot: int,
) -> None:
    """A service process under the supervisor (pid ``parent``): serve on ``sock`` with the
    settings the supervisor resolved; say on ``pipe`` when it serves, or why it could not
    start; give signs of life in ``beats[slot]``."""
    from orchestra.listening import REUSE_PORT, bind_socket
    from orchestra.supervisor import STARTUP_FAILURE, run_service, startup_message

    _die_with_parent(parent)
    settings = msgspec.json.decode(spec, type=Settings)
    logs.setup(settings.logging, process=slot + 1)
    show_key: ShowKey | None = None
    if bootstrap:
        from orchestra.cli import show_bootstrap_key

        def show_key(key: Any, token: str) -> None:
            show_bootstrap_key(key, token, settings.server.host)

    if not bootstrap:
        import orchestra.api.app  # noqa: F401  (most of a start: while the first one starts)

        try:
            if pipe.recv() != GO:  # stopped before it started
                return
        except EOFError:  # the supervisor is gone
            return
    if REUSE_PORT:  # a socket of its own on the supervisor's port (which may have been 0)
        port = sock.getsockname()[1]
        sock.close()
        sock = bind_socket(settings.server.host, port)
    else:  # passed down inheritable: kept from what this process starts (see bind_socket)
        sock.set_inheritable(False)
    link = Link(pipe, beats, slot, parent, settings.server.hang_timeout)
    try:
        run_service(settings, show_key=show_key, sockets=[sock], on_started=link.started)
    except OrchestraError as exc:
        pipe.send((FAILED, startup_message(exc)))
        sys.exit(STARTUP_FAILURE)
    except KeyboardInterrupt:  # Ctrl-C before the server caught its signals
        pass


def _die_with_parent(parent: int) -> None:
    """Ask Linux to send SIGTERM (a graceful stop) to this process when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
