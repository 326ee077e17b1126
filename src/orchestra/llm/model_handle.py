"""The service's side of one model process (:mod:`orchestra.llm.model_process`): how it is
started, what is in flight in it, and its calls' futures."""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestra.llm import model_wire as wire
from orchestra.llm.base import Phase

#: How many of the process's last stderr lines a crash report keeps, and their longest.
STDERR_LINES = 20
STDERR_LINE_CHARS = 2000

#: The hidden first argument that makes the single binary a model process (packaging/entry.py).
MODEL_CHILD_ARG = "--orchestra-model-child"


def child_command() -> list[str]:
    """The command that starts a model process with this interpreter; in the single binary
    (frozen, no ``-m``), the binary itself with a hidden argument."""
    if getattr(sys, "frozen", False):
        return [sys.executable, MODEL_CHILD_ARG]
    return [sys.executable, "-m", "orchestra.llm.model_child"]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, from /proc (None where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fail(future: asyncio.Future[Any], error: Exception) -> None:
    """Fail ``future`` unless it is settled; a caller that gave up waiting (cancelled, timed
    out) reads it no more, which is no reason for asyncio to warn."""
    if not future.done():
        future.set_exception(error)
        future.exception()  # marks it read; an awaiting caller still gets the error


class Call:
    """A request sent to the process and not answered yet."""

    def __init__(self, phase: Phase, on_text: Callable[[str], None] | None) -> None:
        self.phase = phase
        self.on_text = on_text
        self.done: asyncio.Future[wire.FromChild] = asyncio.get_running_loop().create_future()
        #: Nobody waits any more (cancelled, timed out): the answer is dropped.
        self.abandoned = False


class Child:
    """One running process and what is in flight in it."""

    def __init__(self, proc: asyncio.subprocess.Process, probe: bool) -> None:
        self.proc = proc
        #: Started by a health check's probe, and not ready yet.
        self.probe = probe
        self.calls: dict[int, Call] = {}
        #: The request the process said it works on (``Started``), if it is not finished.
        self.current: int | None = None
        self.loaded: asyncio.Future[wire.Loaded] = asyncio.get_running_loop().create_future()
        self.warming = False
        #: Why the supervisor ended it on purpose (stop, hung, bad frames): not a crash.
        self.ended_by: str | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.tasks: list[asyncio.Task[None]] = []
        self.exited = asyncio.Event()

    @property
    def phase(self) -> Phase:
        if not self.loaded.done():
            return Phase.LOADING
        if self.warming:
            return Phase.WARMING_UP
        call = self.calls.get(self.current) if self.current is not None else None
        return call.phase if call is not None else Phase.IDLE

    async def send(self, message: wire.ToChild) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(wire.frame(message))
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass  # the process died: its reader reports how, and fails every call in flight
