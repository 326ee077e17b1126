"""What a model process's crash means, and when to start it again.

A crash is read from the process's exit (a signal, or an exit code) and what it was doing;
:func:`describe` turns it into a :class:`~orchestra.llm.base.Crash` whose message says what
happened and, where there is some, what to do (rebuild llama.cpp portably after a fault while
loading; look at memory after a SIGKILL). :class:`CrashHistory` decides what follows: a
restart after a backoff of 1, 2, 4 … 60 s, or down after ``crash_limit`` crashes within
``window`` seconds.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec

from orchestra.llm.base import Crash, Phase

#: Crashes within ``CRASH_WINDOW`` seconds that take the process down until a probe succeeds.
CRASH_LIMIT = 3
CRASH_WINDOW = 300.0
#: Seconds to wait before restarting after the first crash (then doubled, up to the cap).
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0

#: Signals of native code gone wrong (an instruction the CPU refuses, a bad address).
_FAULTS = frozenset({signal.SIGILL, signal.SIGSEGV, signal.SIGBUS})

#: What to do when native code faults before the model ever answered.
REBUILD_HINT = (
    "rebuild llama-cpp-python portably: make rebuild-llama (README: The embedded model, Build)"
)


class Backoff(msgspec.Struct, frozen=True):
    """When a crashed process is started again, and when it is given up on."""

    first: float = BACKOFF_FIRST
    cap: float = BACKOFF_CAP
    crash_limit: int = CRASH_LIMIT
    window: float = CRASH_WINDOW

    def delay(self, consecutive: int) -> float:
        """Seconds before restart number ``consecutive`` (1, 2, 4 … up to ``cap``)."""
        return float(min(self.cap, self.first * 2 ** max(0, consecutive - 1)))


def signal_label(number: int) -> str:
    """``SIGSEGV``; ``signal 77`` for a number without a name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_name(number: int) -> str:
    """``SIGSEGV (signal 11)``."""
    label = signal_label(number)
    return label if label.startswith("signal") else f"{label} (signal {number})"


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises AMX tiles (where the OS says)."""
    try:
        return "amx_tile" in cpuinfo.read_text(errors="replace")
    except OSError:
        return False


def crash_hint(sig: int | None, phase: Phase, provider: str = "embedded") -> str | None:
    """Advice for a crash of ``provider``'s process, where there is one to give."""
    if sig == signal.SIGKILL:
        return (
            "killed from outside, perhaps by the out-of-memory killer: the model and its "
            f"context ([providers.{provider}] context_length) may need more memory than there is"
        )
    if sig in _FAULTS and phase in (Phase.LOADING, Phase.WARMING_UP):
        if cpu_has_amx():
            return (
                "this CPU advertises AMX, which llama.cpp built with native CPU flags uses and "
                "some virtual machines do not grant to every thread; " + REBUILD_HINT
            )
        return "the llama-cpp-python build may not fit this CPU; " + REBUILD_HINT
    return None


def describe(
    returncode: int, phase: Phase, last_output: str | None, provider: str = "embedded"
) -> Crash:
    """The crash of ``provider``'s process that exited with ``returncode`` in ``phase``."""
    sig = -returncode if returncode < 0 else None
    how = signal_name(sig) if sig else f"exit code {returncode}"
    message = f"embedded model process died: {how} during {phase}"
    hint = crash_hint(sig, phase, provider)
    if hint:
        message += f"; {hint}"
    elif last_output:
        message += f" (its last output: {last_output[:300]})"
    return Crash(
        at=time.time(),
        phase=phase,
        signal=sig,
        exit_code=None if sig else returncode,
        message=message,
    )


class CrashHistory:
    """The crashes of one provider's processes, and what each calls for."""

    def __init__(self, backoff: Backoff, clock: Callable[[], float]) -> None:
        self.backoff = backoff
        self._clock = clock
        self._times: deque[float] = deque()
        #: Crashes since the last real answer (the backoff grows with them).
        self._consecutive = 0
        #: Crashes since the service started, and the latest.
        self.total = 0
        self.last: Crash | None = None

    def record(self, crash: Crash) -> int:
        """Count ``crash``; returns how many fell within the window, this one included."""
        self.total += 1
        self.last = crash
        now = self._clock()
        self._times.append(now)
        while self._times and now - self._times[0] > self.backoff.window:
            self._times.popleft()
        return len(self._times)

    def gives_up(self, recent: int) -> bool:
        """Whether ``recent`` crashes within the window are too many to restart after."""
        return recent >= self.backoff.crash_limit

    def next_delay(self) -> float:
        """Seconds to wait before the restart this crash calls for."""
        self._consecutive += 1
        return self.backoff.delay(self._consecutive)

    def answered(self) -> None:
        """A process answered a real request: the next crash starts the backoff over."""
        self._consecutive = 0

    def forgive(self) -> None:
        """A probe found the model well again: earlier crashes no longer count."""
        self._times.clear()
        self._consecutive = 0
